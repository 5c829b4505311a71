"""A minimal hand-written training loop: the throughput bar the trainer is measured against.

Same model code as the trainer, but none of its machinery: one GPU, no FSDP, bf16 autocast, SDPA, the whole
model under `torch.compile`, fused AdamW, random tokens already on the GPU. Prints tokens/s and MFU (against the
datasheet peak, see `muon_recipes.train.metrics`) as one JSON line; compare with the trainer's `tokens_per_s`:

    python recipes/bench_train_baseline.py --model dense_1b --seq-len 2048 --batch-size 8
    python train.py model=dense_1b mesh=single optim=adamw train.seq_len=2048 train.batch_size=8 train.compile=true
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, like the other recipes

from muon_recipes.config import ModelConfig, load_option  # noqa: E402
from muon_recipes.models import build_model  # noqa: E402
from muon_recipes.models.flops import flops_per_token  # noqa: E402
from muon_recipes.train.metrics import device_peak_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_model_config(name: str) -> ModelConfig:
    return load_option(ROOT / "conf" / "model" / f"{name}.yaml", "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dense_1b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()

    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = load_model_config(args.model)
    with device:
        model = build_model(cfg)
    model.init_weights()
    if not args.no_compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens_per_s = args.steps * args.batch_size * args.seq_len / elapsed
    peak, source = device_peak_flops(device)
    mfu = flops_per_token(cfg, args.seq_len) * tokens_per_s / peak if peak else None
    print(json.dumps({"recipe": "bench_train_baseline", "device": torch.cuda.get_device_name(), "model": args.model,
                      "seq_len": args.seq_len, "batch_size": args.batch_size, "compile": not args.no_compile,
                      "tokens_per_s": round(tokens_per_s), "mfu": mfu, "peak_source": source,
                      "loss": float(loss), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}))


if __name__ == "__main__":
    main()
