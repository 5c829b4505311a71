"""Real torchrun jobs for the fault tests: start one in the background, find its ranks' pids, kill one.

The jobs' output goes to a file (a pipe nobody reads could fill up and block them); a worker's rank is read from
its environment in /proc, so the kill hits the process that torchrun started as that rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    out = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(k, None)
    return out


def torchrun(*args: str, restarts: int = 0, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", "--monitor-interval=0.1", "train.py", *args]


def start(cmd: list, log: Path, **extra_env: str) -> subprocess.Popen:
    """torchrun in the background, its output in `log`."""
    return subprocess.Popen(cmd, cwd=ROOT, env={**env(), **extra_env}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text()


def rank_pids(root_pid: int) -> dict[int, int]:
    """pid of each torchrun worker below `root_pid`, by its RANK environment variable (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = {}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child in (c for c, p in parents.items() if p == pid):
            frontier.append(child)
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = child
    return found


def wait_for(predicate, proc: subprocess.Popen, timeout: float, poll: float = 0.0005):
    """`predicate()`'s first truthy value, or None when `proc` ends or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            return None
        time.sleep(poll)
    return None


def kill_rank(proc: subprocess.Popen, rank: int) -> int:
    pid = rank_pids(proc.pid).get(rank)
    assert pid is not None, "no worker with RANK=%d below torchrun" % rank
    os.kill(pid, signal.SIGKILL)
    return pid


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path, name: str = "metrics.jsonl") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir, name)}
