"""Serve fixtures: a tiny random checkpoint, and uvicorn servers on free 127.0.0.1 ports in
background threads, talked to with the `openai` client (plus raw httpx for what the client hides).
Every request has a timeout and every wait a bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llmcli.checkpoint import write_checkpoint  # noqa: E402
from llmcli.config import Config, ModelConfig, TokenizerConfig  # noqa: E402
from llmcli.load import load_checkpoint  # noqa: E402
from llmcli.models.transformer import Transformer  # noqa: E402
from llmcli.options.inference import ServeOptions  # noqa: E402
from llmcli.serve.app import create_app  # noqa: E402
from llmcli.serve.server import bind_socket, build_state, make_uvicorn_server  # noqa: E402
from llmcli.serve.server import warm_up as warm_up_server  # noqa: E402
from llmcli.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402

# The tokenizer's corpus: any piece of it is a prompt of known characters.
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "ROMEO:\nBut, soft! what light through yonder window breaks?\nuser: assistant: Hello\n") * 3
BLOCK = 64
TIMEOUT = 20.0  # seconds, for any one request
MODEL = "tiny"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random model with large weights (logits far from ties) and a char tokenizer, named MODEL."""
    return char_checkpoint(tmp_path_factory.mktemp("serve") / MODEL, TEXT, BLOCK, std=0.15)


@pytest.fixture(scope="session")
def make_char_checkpoint():
    """char_checkpoint(directory, text, block, std=) (below), for modules that need another vocabulary."""
    return char_checkpoint


def char_checkpoint(directory: Path, text: str, block: int, *, std: float) -> Path:
    """`directory`: a random 2 x 32 Transformer with a char tokenizer of `text`, every matrix drawn
    with spread `std` (large weights keep logits far from ties)."""
    tok = train_tokenizer(TokenizerConfig(kind="char"), [text])
    save_tokenizer(tok, directory.parent / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, n_head=4, d_model=32, block_size=block,
                                    vocab_size=tok.get_vocab_size())).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    write_checkpoint(directory, model, Config(model=model.config), (directory.parent / "tokenizer.json").read_bytes(),
                     {"step": 1})
    return directory


@pytest.fixture(scope="session")
def loaded(checkpoint):
    """(model, tokenizer) of `checkpoint`, as serve loads them."""
    loaded = load_checkpoint(checkpoint)
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """The text the tokenizer was trained on."""
    return TEXT


class Running:
    """A uvicorn server on a free 127.0.0.1 port, in a background thread; `options` are
    ServeOptions fields (model_name defaults to MODEL); a seq2seq model may bring its `source_tokenizer`,
    a speculative server its `speculation` (speculator.Speculation). With `warm_up` it compiles its
    decode step before it starts, as `llmcli serve` does (else on first use, which keeps tests fast)."""

    model = MODEL
    block = BLOCK

    def __init__(self, model, tokenizer, source_tokenizer=None, speculation=None, warm_up=False, **options):
        opts = ServeOptions(run_dir=Path(MODEL), model_name=options.pop("model_name", MODEL), **options)
        self.state = build_state(model, tokenizer, opts, source_tokenizer=source_tokenizer, speculation=speculation)
        if warm_up:
            warm_up_server(self.state)
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = make_uvicorn_server(create_app(self.state), log_level="warning", access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT)

    def get(self, path: str, **kwargs):
        return httpx.get(self.url + path, **{"timeout": TIMEOUT, **kwargs})

    def post(self, path: str, body, **kwargs):
        """POST `body`: JSON for a dict or list, else sent as it is (bytes, str, an iterator)."""
        content = json.dumps(body) if isinstance(body, (dict, list)) else body
        return httpx.post(self.url + path, content=content, **{"timeout": TIMEOUT, **kwargs})

    def http(self):
        """An httpx.Client with the request timeout (for streaming by hand)."""
        return httpx.Client(timeout=TIMEOUT)

    def health(self) -> dict:
        return self.get("/health").json()

    def wait_for(self, ready, what: str, seconds: float = 10.0) -> dict:
        """Poll /health until `ready(health)`; the last health."""
        deadline = time.monotonic() + seconds
        while True:
            h = self.health()
            if ready(h):
                return h
            assert time.monotonic() < deadline, f"the server never got {what}: {h}"
            time.sleep(0.02)

    def wait_idle(self, seconds: float = 10.0) -> dict:
        return self.wait_for(lambda h: h["running"] == 0 and h["waiting"] == 0 and h["in_flight"] == 0, "idle",
                             seconds)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive()


@pytest.fixture(scope="session")
def running_class() -> type[Running]:
    """The Running class, for module-scoped servers of other checkpoints."""
    return Running


@pytest.fixture
def start_server(loaded):
    """start_server(model=None, tokenizer=None, **options): a Running server (of `loaded` unless
    given), stopped after the test."""
    started = []

    def start(model=None, tokenizer=None, **options) -> Running:
        running = Running(model if model is not None else loaded[0],
                          tokenizer if tokenizer is not None else loaded[1], **options)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def serve_process(tmp_path):
    """serve_process(*args, env={}): `llmcli serve ARGS --port 0 --threads 1` in a subprocess (env: more
    variables, None unsets one); (process, base url, log path) once it printed its address; killed
    after the test if still running."""
    started = []

    def start(*args, env=None):
        log_path = tmp_path / f"server-{len(started)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", *map(str, args), "--port", "0",
                                     "--threads", "1"], stdout=log, stderr=subprocess.STDOUT,
                                    env=_environment(env or {}))
        started.append(proc)
        deadline, url = time.monotonic() + 120, None  # a cold compile of the decode step comes first
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            found = [w for w in log_path.read_text().split() if w.startswith("http://127.0.0.1:")]
            url = found[0].removesuffix("/v1") if found else None
            time.sleep(0.05)
        return proc, url, log_path

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _environment(changes: dict[str, str | None]) -> dict[str, str]:
    merged = {**os.environ, **changes}
    return {name: value for name, value in merged.items() if value is not None}


@pytest.fixture(scope="module")
def server(loaded):
    """One per test module. 4 slots, so that 16 concurrent requests queue and join the batch as
    others finish."""
    running = Running(*loaded, max_batch_size=4, max_queue=64)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="session")
def complete():
    """complete(client, prompt, **kwargs): a completion of MODEL, greedy unless told otherwise."""

    def run(client, prompt, **kwargs):
        kwargs.setdefault("temperature", 0)
        return client.completions.create(model=MODEL, prompt=prompt, **kwargs)

    return run


@pytest.fixture(scope="session")
def error_of():
    """error_of(response): the `error` object of an OpenAI-shaped error body (checking its shape)."""

    def check(response) -> dict:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]

    return check
