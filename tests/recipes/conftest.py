"""Fixtures of the recipe tests."""

from __future__ import annotations

import pytest
from script_runs import start_all


@pytest.fixture(scope="session")
def script_runs(tmp_path_factory):
    """The registered recipe scripts (`script_runs.background_script`), all started when a test first asks for
    one: name -> `script_runs.Started`."""
    started = start_all(tmp_path_factory.mktemp)
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
