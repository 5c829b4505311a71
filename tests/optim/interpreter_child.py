"""Running a test file's kernel checks in a child process under Triton's CPU interpreter.

`TRITON_INTERPRET=1` only takes effect if it is set before triton is imported, and it would change every later
Triton user of the same pytest process, so the kernel tests run their checks in a child process (the test file
run as a script) that prints its measurements as JSON on its last line of output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def interpreter_results(script: str, *args: str, timeout: float = 900) -> dict:
    """Run `script` (with `args`) under `TRITON_INTERPRET=1` with the project on its path; its last line, parsed.
    Fails the calling test with the child's error output when it fails."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"interpreter child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
