"""Refuse, before start-up, a config whose memory need is out of reach of the machine, naming the key to change.

A vocabulary of two billion tokens or a batch of a million sequences passes every range check and then fails
inside the allocator with a traceback. `check_fits_in_memory` adds up a lower bound of what one process must
hold, from the config alone, and compares it with the memory one process can have (a GPU's total memory; on
CPU the machine's RAM shared by the processes of this node). Only a need beyond the whole of it is refused, so
the check never stops a run that could fit; whatever it does not count still fails later, with one line.

The lower bound, per process, in bytes:

* weights: at start-up every rank builds the whole model in fp32 (4 N bytes) before sharding; once sharded,
  weights, gradients and up to two optimizer moments are 16 N / world bytes; the larger of the two counts;
* rotary tables: `max_seq_len x head_dim / 2` angles in float64 (8 bytes) and their cos and sin (4 bytes each);
* logits of one micro-batch: `batch_size x seq_len x vocab_size`, fp32, with their gradient (8 bytes each).

Each part is put down to the key that sizes it (the vocabulary, when its tables are most of the weights, sizes the
logits too), and "about N would fit" scales that key's value by the room the other parts leave (every part grows
about linearly in its key, the weights about quadratically in d_model).
"""

from __future__ import annotations

import os

from muon_recipes.config import ConfigError, RunConfig

GIB = 1 << 30


def _memory_per_process(device_type: str) -> tuple[int, str]:
    """(bytes, description) of the memory one process of this node can have."""
    if device_type == "cuda":
        import torch

        total = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        return total, "the GPU's memory"
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))), 1)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // local, "this machine's RAM" + (f" shared by {local} processes" if local > 1 else "")


def memory_floor(rc: RunConfig, world_size: int) -> dict[str, int]:
    """Lower bounds in bytes of what one process holds, by the config key that sizes each part."""
    from muon_recipes.models.flops import param_counts

    m, t = rc.model, rc.train
    counts = param_counts(m)
    weights = max(4 * counts.total, 16 * counts.total // max(world_size, 1))
    tables = 2 * counts.embedding if not m.tie_embeddings else counts.embedding  # embedding and head: vocab x d
    head_dim = m.d_model // m.n_heads
    rotary = m.max_seq_len * (head_dim // 2) * (8 + 4 + 4)
    logits = t.batch_size * t.seq_len * m.vocab_size * 8
    if tables * 2 > counts.total:  # the vocabulary dominates the weights, and it sizes the logits as well
        return {"model.vocab_size": weights + logits, "model.max_seq_len": rotary}
    return {"model.d_model": weights, "model.max_seq_len": rotary, "train.batch_size": logits}


def check_fits_in_memory(rc: RunConfig, device_type: str, world_size: int) -> None:
    """ConfigError naming the key behind the largest part of the need when the need exceeds the memory."""
    parts = memory_floor(rc, world_size)
    available, where = _memory_per_process(device_type)
    need = sum(parts.values())
    if need <= available:
        return
    key, largest = max(parts.items(), key=lambda kv: kv[1])
    value = {"model.vocab_size": rc.model.vocab_size, "model.d_model": rc.model.d_model,
             "model.max_seq_len": rc.model.max_seq_len, "train.batch_size": rc.train.batch_size}[key]
    room = available - (need - largest)  # what this part may take with the others as they are
    # The weights grow about as d_model squared (the d x d and d x ffn matrices); every other part linearly.
    estimate = int(value * (room / largest) ** (0.5 if key == "model.d_model" else 1.0)) if room > 0 else 0
    fits = f"; about {estimate:,} would fit" if estimate else ""
    raise ConfigError(key, value, f"needs at least {need / GIB:,.1f} GiB per process ({largest / GIB:,.1f} GiB for "
                                  f"what {key} sizes), more than the {available / GIB:,.1f} GiB of {where}{fits}")
