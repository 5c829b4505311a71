"""A small deterministic Muon + AdamW run on CPU whose final parameters are stored as a reference.

`reference_run()` builds `optim_toy_models.ToyModel` (fused QKV under GQA, fused gate/up, 3-D expert weights
with and without a fused gate/up inside, a matrix with fewer rows than columns, router, norms, biases,
embedding, head) three times under different optimizer settings, steps each a few times with seeded
gradients on the torch backend, and returns every parameter. Groups are written out as plain dicts, the
`torch.optim.Optimizer` API that users of `Muon` hold on to, so the reference outlives refactors of
`build_param_groups` and the constructor's defaults.

Regenerate deliberately (only when the optimizer's arithmetic is meant to change, and say so in the commit):

    python tests/optim/step_reference.py

which rewrites `tests/optim/data/muon_step_reference.pt`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optim_toy_models import ToyModel, fill_grads  # noqa: E402

from muon_recipes.optim import Muon  # noqa: E402
from muon_recipes.optim.blocks import collect_layouts  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "data" / "muon_step_reference.pt"
STEPS = 3
ADAMW_ROLES = ("embedding", "output", "norm", "bias", "router")

# Three settings that between them take every branch of the CPU step: split and fused blocks, per-expert and
# fused experts, both schedules, both iteration forms, bf16 and fp32 Newton-Schulz, Nesterov on and off,
# every adjust_lr mode, with and without weight decay.
SETTINGS = {
    "split_keller_gram_bf16": dict(split=True, experts="per_expert", muon=dict(
        lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01, adjust_lr="spectral_norm", ns_steps=5,
        ns_schedule="keller", ns_method="gram", ns_dtype="bfloat16")),
    "fused_polar_standard_fp32": dict(split=False, experts="fused", muon=dict(
        lr=0.03, momentum=0.9, nesterov=False, weight_decay=0.0, adjust_lr="rms_norm", ns_steps=5,
        ns_schedule="polar_express", ns_method="standard", ns_dtype="float32")),
    "split_keller_gram_fp32_3steps": dict(split=True, experts="per_expert", muon=dict(
        lr=0.01, momentum=0.8, nesterov=True, weight_decay=0.1, adjust_lr="none", ns_steps=3,
        ns_schedule="keller", ns_method="gram", ns_dtype="float32")),
}
ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def param_groups(model: ToyModel, split: bool, experts: str, muon: dict) -> list[dict]:
    """Muon groups keyed by (split_sizes, experts), then AdamW with and without decay, as plain dicts."""
    layouts = collect_layouts(model)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        layout = layouts[name]
        if layout.role in ADAMW_ROLES or p.ndim < 2:
            decay = p.ndim >= 2 and layout.role not in ("embedding", "norm", "bias")
            key = ("adamw", decay)
            hyper = dict(algorithm="adamw", **ADAMW, weight_decay=0.1 if decay else 0.0)
        else:
            split_sizes = tuple(layout.row_blocks) if split and layout.row_blocks else None
            mode = experts if layout.experts else "per_expert"
            key = ("muon", split_sizes, mode)
            hyper = dict(algorithm="muon", **muon, backend="torch", split_sizes=split_sizes, experts=mode)
        groups.setdefault(key, dict(params=[], **hyper))["params"].append(p)
    return list(groups.values())


def reference_run() -> dict[str, torch.Tensor]:
    """`{setting/parameter name: final value}` after `STEPS` optimizer steps of each setting, on one thread
    (CPU matmuls may split their reductions differently with more threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for index, (label, setting) in enumerate(SETTINGS.items()):
            torch.manual_seed(index)
            model = ToyModel()
            opt = Muon(param_groups(model, **setting))
            for step in range(STEPS):
                fill_grads(model, step, seed=index)
                opt.step()
            out.update({f"{label}/{name}": p.detach().clone() for name, p in model.named_parameters()})
        return out
    finally:
        torch.set_num_threads(threads)


def environment() -> dict[str, str]:
    """What decides the CPU kernels' rounding: the torch build, the instruction set torch dispatches its own kernels
    to, and the CPU's AVX-512 and AMX extensions, which the matmul libraries pick at run time (two CPUs that both
    report AVX512 to torch, one with avx512_bf16/avx512_fp16 and one without, rounded 49 of this run's 66
    parameters differently in their last bits)."""
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_extensions": " ".join(cpu_extensions())}


def cpu_extensions() -> list[str]:
    """The AVX-512 and AMX feature flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")))


if __name__ == "__main__":
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"environment": environment(), "params": reference_run()}, REFERENCE)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size / 1024:.0f} KiB) on {environment()}")
