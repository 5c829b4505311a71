"""Fixtures for the whole suite."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def isolated_data_cache(tmp_path_factory):
    """Fitted tokenizers and tokenized corpora go to a cache of this test session (inherited by the processes the
    tests start), never the user's ~/.cache: a test sees neither another session's artifacts nor leaves its own."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MUON_RECIPES_CACHE", str(tmp_path_factory.mktemp("data-cache")))
    yield
    patch.undo()
