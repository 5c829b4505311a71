"""Throughput, MFU and memory numbers for the per-step metrics.

MFU (model FLOPs utilization, PaLM, Chowdhery et al. 2022, appendix B) = achieved model FLOP/s divided by the
device's peak. Model FLOPs per token come from `muon_recipes.models.flops`; the peak is the dense bf16 tensor-core
number of the device's datasheet (table below), or `MUON_RECIPES_PEAK_TFLOPS` when set (e.g. for a device not in
the table, or to compare against a measured cuBLAS peak). On CPU MFU is not reported.
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

# Dense (no sparsity) BF16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets. Matched by substring of
# torch.cuda.get_device_name(), first match wins (more specific names first).
DATASHEET_BF16_TFLOPS = (
    ("H200", 989.4),  # H200 SXM datasheet (same tensor cores as H100 SXM)
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # H100 SXM5 datasheet
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.2),
)


def device_peak_flops(device: torch.device) -> tuple[Optional[float], str]:
    """(peak FLOP/s per device or None, where the number comes from)."""
    override = os.environ.get("MUON_RECIPES_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12, "MUON_RECIPES_PEAK_TFLOPS"
    if device.type != "cuda":
        return None, "no peak for CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{key} bf16 dense datasheet"
    return None, f"unknown device {name!r}: set MUON_RECIPES_PEAK_TFLOPS"


class Stopwatch:
    """Wall-clock sections of a step; synchronizes CUDA at each mark so the split is real, not queued work."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self._t = time.perf_counter()

    def _sync(self) -> None:
        if self.enabled and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self._sync()
        self._t = time.perf_counter()

    def lap(self) -> float:
        self._sync()
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt


def peak_memory_gib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def bits_per_byte(nats_per_token: float, tokens: float, text_bytes: float) -> Optional[float]:
    """Bits per byte of text: (nats per token) x (tokens / bytes) / ln 2; None when the tokens cover no byte.

    A loss in nats per token depends on how much text a token holds, so runs with different tokenizers or corpora
    cannot be compared by it; per byte of UTF-8 text they can (the measure of the Pile, Gao et al. 2020, sec. 4,
    and of the byte-level language modelling literature). `tokens` and `text_bytes` count the same targets;
    special tokens (EOS) stand for no byte, so predicting them costs bits charged to the text around them.
    """
    if text_bytes <= 0:
        return None
    return nats_per_token * tokens / text_bytes / math.log(2)
