"""Fixtures shared by the data tests: config and corpus helpers, a small text file, the plays."""

import io

import pytest
from rich.console import Console

from llmcli.config_loader import load_config
from llmcli.data.sources import load_corpus

LINES = "".join(f"line {i:03d}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))


@pytest.fixture(scope="session")
def cfg():
    """cfg(*overrides): the default config with `key=value` overrides."""
    def cfg(*overrides):
        return load_config(None, list(overrides))
    return cfg


@pytest.fixture(scope="session")
def texts():
    """texts(corpus, split): the documents of one split, as a list."""
    def texts(corpus, split):
        return list(corpus[split]["text"])
    return texts


@pytest.fixture(scope="session")
def quiet():
    """quiet(): a Console that writes into a StringIO, and the StringIO."""
    def quiet():
        buf = io.StringIO()
        return Console(file=buf, width=200), buf
    return quiet


@pytest.fixture(scope="session")
def lines():
    """The text of `txt`: 200 numbered lines."""
    return LINES


@pytest.fixture
def txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(LINES)
    return path


@pytest.fixture(scope="session")
def shakespeare(cfg):
    return load_corpus(cfg().data, console=Console(quiet=True))
