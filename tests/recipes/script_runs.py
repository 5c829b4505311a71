"""Recipe scripts of several test files started together, in the background, by the first test that needs one.

The dry runs of `recipes/*.sh` run their stages one process at a time (as they must on a GPU: each stage is timed
alone), so on a small CPU runner each leaves all cores but one idle for half a minute or more. A test file
registers its script's command here (`background_script`, at import); the session fixture `script_runs`
(tests/recipes/conftest.py) starts every registered one at once the first time a test asks for one, each with its
own work directory, and a test waits for its own (`Started.result`) and checks its output as before. Only the
scripts of the collected files are started.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]

# name -> function(work dir) -> (command, environment, timeout in seconds)
REGISTERED: dict[str, Callable[[Path], tuple[list, dict, float]]] = {}


def background_script(name: str):
    """Register `make(work dir) -> (command, environment, timeout)` as the background script `name`."""
    def register(make):
        REGISTERED[name] = make
        return make
    return register


@dataclass
class Started:
    work: Path
    proc: subprocess.Popen
    timeout: float
    started: float

    def result(self) -> subprocess.CompletedProcess:
        """Wait for the script (at most its timeout from its start); its exit code and output."""
        try:
            self.proc.wait(timeout=max(0.0, self.started + self.timeout - time.monotonic()))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        out, err = ((self.work / name).read_text() for name in ("stdout.txt", "stderr.txt"))
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def start_all(new_dir: Callable[[str], Path]) -> dict[str, Started]:
    started = {}
    for name, make in REGISTERED.items():
        work = new_dir(name)
        command, env, timeout = make(work)
        with open(work / "stdout.txt", "w") as out, open(work / "stderr.txt", "w") as err:
            proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=err, text=True)
        started[name] = Started(work, proc, timeout, time.monotonic())
    return started
