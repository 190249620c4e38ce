"""Shared fixtures: every test gets its own empty llmcli cache, so nothing touches ~/.cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """A fresh LLMCLI_CACHE_DIR for this test (prepared data, datasets' cache for local files)."""
    path = tmp_path_factory.mktemp("llmcli-cache")
    monkeypatch.setenv("LLMCLI_CACHE_DIR", str(path))
    return path


@pytest.fixture
def sample_txt() -> Path:
    """data/sample.txt: a few Shakespeare sonnets, about 5 KB."""
    return REPO / "data" / "sample.txt"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny models, where extra threads only add contention (and noise) on small CI boxes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
