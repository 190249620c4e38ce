"""Fixtures shared by the data tests: config and corpus helpers, a small text file, the plays."""

import io

import pytest
from rich.console import Console

from llmcli.config_loader import load_config
from llmcli.data.sources import open_corpus
from llmcli.data.split import plan_split, route

LINES = "".join(f"line {i:03d}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))


@pytest.fixture(scope="session")
def cfg():
    """cfg(*overrides): the default config with `key=value` overrides."""
    def cfg(*overrides):
        return load_config(None, list(overrides))
    return cfg


def read_corpus(data_cfg, console=None):
    """The documents of each split (those with any), whole, as lists: the streamed corpus collected."""
    corpus = open_corpus(data_cfg, console=console or Console(quiet=True))
    out, current = {}, {}
    for split, text, ends in route(corpus, plan_split(corpus, data_cfg)):
        current[split] = current.get(split, "") + text
        if ends:
            out.setdefault(split, []).append(current.pop(split))
    return {s: out[s] for s in ("train", "val", "test") if s in out}


@pytest.fixture(scope="session")
def load_corpus():
    """load_corpus(data_cfg, console=None): read_corpus."""
    return read_corpus


@pytest.fixture(scope="session")
def texts():
    """texts(corpus, split): the documents of one split, as a list."""
    def texts(corpus, split):
        return list(corpus[split])
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
    return read_corpus(cfg().data)
