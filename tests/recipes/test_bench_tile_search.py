"""recipes/bench_tile_search.py on the CPU: moe_small's buckets and the tile searches and candidate binaries each
MUON_NS_AUTOTUNE mode makes of them, against a count from the two forms of Newton-Schulz."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_moe_small_searches_and_candidate_binaries_per_mode(tmp_path):
    from muon_recipes.optim.kernels.tuning import BOUNDED_CANDIDATES, matmul_configs, prune_configs

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "recipes/bench_tile_search.py", "--model", "moe_small", "--device", "cpu",
                           "--out", str(tmp_path / "r.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    # q and o (512 x 512), k and v (256 x 512), the dense layer's gate, up and down (512 x 2048), the experts'
    # (8 routed + 1 shared, 7 layers, 3 matrices: 189 of 512 x 768).
    assert sorted(map(tuple, report["buckets"])) == sorted([(16, 512, 512), (16, 256, 512), (3, 512, 2048),
                                                            (189, 512, 768)])
    # Problem keys: the square bucket's X X^T and b A + c A A share one (same sizes and dtypes), plus its update;
    # the 256 x 512 bucket has three; each Gram-form bucket four (R, the m x m polynomials, Q X in float16 at a
    # restart and the last Q X in bf16).
    searches = 2 + 3 + 4 + 4
    # Kernel variants: bf16 symmetric without and with C, bf16 update with a X; float16 symmetric without and with
    # C, float16 Q X to float16 and to bf16. The full search compiles every pruned tile of each.
    x = torch.empty(0, dtype=torch.bfloat16)
    symmetric = len(prune_configs(matmul_configs(interpreted=False), {"M": 512, "K": 512, "x_ptr": x}))
    update = len(prune_configs(matmul_configs(interpreted=False), {"M": 512, "N": 768, "K": 512, "x_ptr": x}))
    rows = report["rows"]
    assert {mode: row["searches"] for mode, row in rows.items()} == {m: searches for m in rows}
    assert rows["full"]["binaries"] == 4 * symmetric + 3 * update
    assert 7 <= rows["heuristic"]["binaries"] <= searches
    assert rows["heuristic"]["binaries"] < rows["bounded"]["binaries"] <= BOUNDED_CANDIDATES * searches
    assert rows["bounded"]["binaries"] <= rows["full"]["binaries"] / 2
