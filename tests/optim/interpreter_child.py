"""Running a test file's kernel checks in a child process under Triton's CPU interpreter.

`TRITON_INTERPRET=1` only takes effect if it is set before triton is imported, and it would change every later
Triton user of the same pytest process, so the kernel tests run their checks in a child process (the test file
run as a script) that prints its measurements as JSON on its last line of output.

The interpreter runs a kernel as single-threaded Python, and pytest waits for the child doing nothing, so on a
machine of several cores all but one would sit idle for the whole check. A file whose checks are independent units
(shapes, dtypes) runs them in `shards` children at once instead (`interpreter_shards`): each gets
`--shard K/N` and runs its share of the units (`my_units`), every unit exactly as the single child would (same
inputs, same seeds, a fresh process like the single child's), and the parent merges their answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "TRITON_INTERPRET": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def interpreter_results(script: str, *args: str, timeout: float = 900) -> dict:
    """Run `script` (with `args`) under `TRITON_INTERPRET=1` with the project on its path; its last line, parsed.
    Fails the calling test with the child's error output when it fails."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=_env(), timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"interpreter child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def shard_count(units: int, most: int = 4) -> int:
    """How many interpreter children to run at once: one per core this process may use, at most `most` (each child
    pays its own imports) and at most one per unit."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, most, units))


def my_units(units: list, argv: list[str]) -> list:
    """The share of `units` of the child started with `--shard K/N` in `argv` (all of them without it): every N-th
    unit from the K-th, so that shards of a list ordered by size get about equal work."""
    shard = next((a.split("=", 1)[1] for a in argv if a.startswith("--shard=")), "0/1")
    k, n = map(int, shard.split("/"))
    return [u for i, u in enumerate(units) if i % n == k]


def interpreter_shards(script: str, *args: str, shards: int, timeout: float = 900) -> list[dict]:
    """`interpreter_results` of `shards` children of `script` run at the same time, child K with `--shard=K/shards`
    (after `args`); their parsed last lines in shard order. Fails the calling test with the first failing child's
    error output."""
    pytest.importorskip("triton")
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for k in range(shards):
                out, err = (open(Path(tmp, f"{k}.{s}"), "w+") for s in ("out", "err"))
                proc = subprocess.Popen([sys.executable, script, *args, f"--shard={k}/{shards}"], stdout=out,
                                        stderr=err, text=True, env=_env())
                procs.append((proc, out, err))
            deadline = time.monotonic() + timeout
            for proc, _, _ in procs:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            results = []
            for k, (proc, out, err) in enumerate(procs):
                out.seek(0), err.seek(0)
                if proc.returncode != 0:
                    pytest.fail(f"interpreter child {k}/{shards} failed:\n{err.read()[-4000:]}")
                results.append(json.loads(out.read().strip().splitlines()[-1]))
            return results
        finally:
            for proc, out, err in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                out.close(), err.close()
