"""`llmcli serve` through real HTTP on 127.0.0.1: a uvicorn server in a background thread per test
server, a tiny random model, and the `openai` client (plus raw httpx for what the client hides).
Every request has a timeout and every wait a bound."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from llmcli.checkpoint import write_checkpoint  # noqa: E402
from llmcli.cli import app as cli_app  # noqa: E402
from llmcli.config import Config, ModelConfig, TokenizerConfig  # noqa: E402
from llmcli.errors import UserError  # noqa: E402
from llmcli.generate import load_for_inference  # noqa: E402
from llmcli.model import Transformer  # noqa: E402
from llmcli.serve import (  # noqa: E402
    ChatTemplate,
    bind_socket,
    build_state,
    create_app,
    load_chat_template,
    make_uvicorn_server,
)
from llmcli.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "ROMEO:\nBut, soft! what light through yonder window breaks?\nuser: assistant: Hello\n") * 3
BLOCK = 64
TIMEOUT = 20.0  # seconds, for any one request
MODEL = "tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random model with large weights (logits far from ties) and a char tokenizer."""
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(TokenizerConfig(kind="char"), [TEXT])
    save_tokenizer(tok, root / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, n_head=4, d_model=32, block_size=BLOCK,
                                    vocab_size=tok.get_vocab_size())).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    cfg = Config()
    cfg.model = model.config
    write_checkpoint(root / MODEL, model, cfg, root / "tokenizer.json", {"step": 1})
    return root / MODEL


@pytest.fixture(scope="module")
def loaded(checkpoint):
    _, model, tokenizer = load_for_inference(checkpoint, torch.device("cpu"), torch.float32)
    return model, tokenizer


class Running:
    """A uvicorn server on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, model, tokenizer, **options):
        self.state = build_state(model, tokenizer, model_name=options.pop("model_name", MODEL), **options)
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

    def post(self, path: str, body, **kwargs):
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, timeout=TIMEOUT, **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=TIMEOUT).json()

    def wait_idle(self, seconds: float = 10.0) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            h = self.health()
            if h["running"] == 0 and h["waiting"] == 0 and h["in_flight"] == 0:
                return h
            assert time.monotonic() < deadline, f"the server stayed busy: {h}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(loaded):
    """4 slots, so that 16 concurrent requests queue and join the batch as others finish."""
    running = Running(*loaded, max_batch_size=4, max_queue=64)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def complete(client, prompt, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model=MODEL, prompt=prompt, **kwargs)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- the happy paths ---------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = server.health()
    assert health["status"] == "ok" and health["model"] == MODEL and health["max_batch_size"] == 4


def test_greedy_completion_equals_llmcli_generate(server, client, checkpoint):
    prompts = ["ROMEO:", "All: Speak", "Before we proceed " * 8]  # the last is longer than the context
    result = CliRunner().invoke(cli_app, ["generate", str(checkpoint), "--lines", "--json", "-n", "30",
                                          "--temperature", "0"], input="\n".join(prompts) + "\n")
    assert result.exit_code == 0, result.output
    expected = [json.loads(line)["completion"] for line in result.stdout.splitlines()]
    result = CliRunner().invoke(cli_app, ["generate", str(checkpoint), "", "--json", "-n", "30",
                                          "--temperature", "0"])
    assert result.exit_code == 0, result.output
    prompts.append("")  # from <|endoftext|>
    expected.append(json.loads(result.stdout)["completion"])
    for prompt, want in zip(prompts, expected, strict=True):
        got = complete(client, prompt, max_tokens=30)
        (choice,) = got.choices
        assert choice.text == want
        assert choice.finish_reason in ("stop", "length") and got.object == "text_completion"
        assert got.id.startswith("cmpl-") and got.model == MODEL
        assert got.usage.prompt_tokens == min(max(len(prompt), 1), BLOCK)  # char tokenizer: a token a char
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        assert 1 <= got.usage.completion_tokens <= 30


def test_streaming_reassembles_to_the_same_text(client):
    whole = complete(client, "ROMEO:", max_tokens=40, extra_body={"ignore_eos": True})
    chunks = list(complete(client, "ROMEO:", max_tokens=40, stream=True, extra_body={"ignore_eos": True},
                           stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(text) == 40
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40

    messages = [{"role": "user", "content": "Speak"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert chat.object == "chat.completion" and stream[0].object == "chat.completion.chunk"


def test_chat_uses_the_template(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    prompt = "system: Be brief.\nuser: Speak\nassistant:"
    plain = complete(client, prompt, max_tokens=30, stop=["\nuser:"])
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(prompt)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Sp"}, {"type": "text", "text": "eak"}]}]
    again = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=30, temperature=0)
    alone = client.chat.completions.create(model=MODEL, messages=messages[1:], max_tokens=30, temperature=0)
    assert again.choices[0].message.content == alone.choices[0].message.content


def test_chat_template_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"prefix": "<chat>\n", "message": "<{role}> {content}\n",
                                "roles": {"system": "[{content}]\n"}, "generation_prompt": "<assistant>",
                                "stop": ["<user>"]}))
    template = load_chat_template(path)
    assert template.render([("system", "x"), ("user", "a {b}")]) == "<chat>\n[x]\n<user> a {b}\n<assistant>"
    assert template.stop == ("<user>",)
    assert ChatTemplate().render([("user", "hi")]) == "user: hi\nassistant:"
    for content, message in [({"message": "{name}"}, "unknown field {name}"), ({"mesage": "x"}, "unknown key"),
                             ({"message": "{role"}, "literal braces"), ({"stop": [""]}, "non-empty")]:
        path.write_text(json.dumps(content))
        with pytest.raises(UserError, match=message):
            load_chat_template(path)


def test_stop_strings_cut_exactly(client):
    free = complete(client, "ROMEO:", max_tokens=40, extra_body={"ignore_eos": True}).choices[0].text
    stop = free[12:15]
    cut = complete(client, "ROMEO:", max_tokens=40, stop=stop, extra_body={"ignore_eos": True})
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = complete(client, "ROMEO:", max_tokens=40, stop=[stop, "zzz"], stream=True,
                        extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == free[:free.index(stop)]


def test_n_seeds_and_prompt_lists(client):
    sampled = dict(max_tokens=20, temperature=1.0, seed=7, extra_body={"top_k": 20, "ignore_eos": True})
    first = complete(client, "All:", n=3, **sampled)
    again = complete(client, "All:", n=3, **sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # seed, seed + 1, seed + 2
    single = complete(client, "All:", **{**sampled, "seed": 8})
    assert single.choices[0].text == first.choices[1].text
    assert first.usage.prompt_tokens == 4 and first.usage.completion_tokens == 60
    both = complete(client, ["All:", "ROMEO:"], n=2, **sampled)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices[:2]] == [c.text for c in first.choices[:2]]
    assert both.usage.prompt_tokens == 4 + 6
    echoed = complete(client, "All:", max_tokens=5, echo=True)
    assert echoed.choices[0].text == "All:" + complete(client, "All:", max_tokens=5).choices[0].text
    ids = complete(client, [[5, 6, 7]], max_tokens=5)
    assert ids.usage.prompt_tokens == 3


def test_sixteen_concurrent_greedy_requests_equal_their_sequential_results(server, client):
    prompts = [TEXT[i * 7:i * 7 + 3 + i] for i in range(16)]
    lengths = [8 + 3 * i for i in range(16)]

    def run(i: int) -> str:
        kwargs = dict(max_tokens=lengths[i], extra_body={"ignore_eos": True})
        if i % 2:
            return "".join(c.choices[0].text for c in complete(client, prompts[i], stream=True, **kwargs))
        return complete(client, prompts[i], **kwargs).choices[0].text

    sequential = [run(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(run, range(16), timeout=60))
    assert concurrent == sequential
    assert all(len(t) >= n for t, n in zip(sequential, lengths, strict=True))  # <unk> decodes to 5 chars
    server.wait_idle()


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "a", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "a", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "a", "stop": [""]}, "stop", "cannot be empty"),
    ({"prompt": "a", "seed": -3}, "seed", "greater than or equal to 0"),
    ({"prompt": "a", "top_k": "many"}, "top_k", "valid integer"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({}, "prompt", "Field required"),
    ({"prompt": "Zebra 42"}, "prompt", "never saw: '2' '4' 'Z'"),
    ({"prompt": [[9999]]}, "prompt", "outside the vocabulary"),
    ({"prompt": "a", "logprobs": 2}, "logprobs", "not supported"),
    ({"prompt": "a", "n": 100}, "n", "at most 68"),
])
def test_invalid_parameters_are_400_naming_the_field(server, body, param, words):
    response = server.post("/v1/completions", body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_bodies_and_chat_fields_are_400(server):
    for body in (b"{not json", b"[1, 2]", b""):
        response = server.post("/v1/completions", body)
        assert response.status_code == 400 and "JSON" in error_of(response)["message"]
    response = server.post("/v1/chat/completions", {"messages": []})
    assert response.status_code == 400 and error_of(response)["param"] == "messages"
    response = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]})
    assert response.status_code == 400 and error_of(response)["param"].startswith("messages.0.content")
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    response = server.post("/v1/chat/completions", {"messages": [image]})
    assert response.status_code == 400 and "only text" in error_of(response)["message"]


def test_unknown_model_and_route_are_404(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="a")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    response = httpx.get(server.url + "/v1/nope", timeout=TIMEOUT)
    assert response.status_code == 404 and "no route" in error_of(response)["message"]


def test_bodies_over_a_mebibyte_are_413(server):
    big = json.dumps({"prompt": "a" * (1 << 20)})
    response = server.post("/v1/completions", big)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the size is counted as the body streams in
        for _ in range(20):
            yield b" " * 65536

    response = httpx.post(server.url + "/v1/completions", content=chunked(), timeout=TIMEOUT)
    assert response.status_code == 413
    assert complete(server.client(), "ROMEO:", max_tokens=3).choices[0].text  # still serving


def test_a_prompt_longer_than_the_context_is_truncated_not_an_error(server, client):
    long = "Speak, speak. " * 400  # 5600 characters: tokenized off the event loop
    got = complete(client, long, max_tokens=10, extra_body={"ignore_eos": True})
    assert got.usage.prompt_tokens == BLOCK and len(got.choices[0].text) == 10
    tail = complete(client, long[-BLOCK:], max_tokens=10, extra_body={"ignore_eos": True})
    assert tail.choices[0].text == got.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}],
                                          max_tokens=5, temperature=0)
    assert chat.usage.prompt_tokens == BLOCK


def test_api_key(loaded):
    running = Running(*loaded, api_key="sekrit")
    try:
        for key in ("wrong", "sekrit2"):
            with pytest.raises(openai.AuthenticationError) as info:
                complete(running.client(key), "ROMEO:", max_tokens=2)
            assert info.value.body["code"] == "invalid_api_key"
        response = httpx.get(running.url + "/v1/models", timeout=TIMEOUT)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
        assert httpx.get(running.url + "/v1/nope", timeout=TIMEOUT).status_code == 401  # no route probing
        assert complete(running.client("sekrit"), "ROMEO:", max_tokens=2).choices[0].text
        assert running.health()["status"] == "ok"  # /health needs no key
    finally:
        running.stop()


def test_a_full_queue_is_429_and_shutting_down_is_503(loaded):
    running = Running(*loaded, max_batch_size=1, max_queue=1)
    try:
        running.state.engine.pause()  # requests are admitted but nothing runs
        with ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(complete, running.client(), p, max_tokens=5) for p in ("All:", "ROMEO:")]
            deadline = time.monotonic() + 10
            while running.health()["in_flight"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            response = running.post("/v1/completions", {"prompt": "a"})
            assert response.status_code == 429 and response.headers["retry-after"]
            assert error_of(response)["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                complete(running.client(), "a", max_tokens=2)
            running.state.engine.resume()
            assert all(f.result(timeout=TIMEOUT).choices[0].text for f in pending)
        running.wait_idle()
        running.state.begin_shutdown()
        response = running.post("/v1/completions", {"prompt": "a"})
        assert response.status_code == 503 and error_of(response)["type"] == "server_error"
        assert httpx.get(running.url + "/health", timeout=TIMEOUT).status_code == 503
    finally:
        running.state.engine.resume()
        running.stop()


def test_client_disconnects_cancel_their_sequences(server, client):
    server.wait_idle()
    before = server.health()["generated_tokens"]
    body = {"prompt": "ROMEO:", "max_tokens": 60000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for _, line in zip(range(6), lines, strict=False) if line.startswith("data:")]
            assert len(received) >= 2
    # The connection is closed: the sequence must leave the batch long before 60000 tokens.
    health = server.wait_idle()
    assert health["generated_tokens"] - before < 30000

    before = health["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    health = server.wait_idle()
    assert health["generated_tokens"] - before < 30000
    assert complete(client, "ROMEO:", max_tokens=4).choices[0].text  # the slot is free again


def test_quantized_checkpoints_serve_like_any_other(checkpoint, tmp_path):
    from llmcli.quantize import quantize_checkpoint

    out = tmp_path / "int8"
    quantize_checkpoint(checkpoint, out, method="int8", eval_tokens=0, decode_tokens=0)
    _, model, tokenizer = load_for_inference(out, torch.device("cpu"), torch.float32)
    running = Running(model, tokenizer, model_name="int8")
    try:
        got = running.client().completions.create(model="int8", prompt="ROMEO:", max_tokens=8, temperature=0,
                                                  extra_body={"ignore_eos": True})
        assert len(got.choices[0].text) == 8
    finally:
        running.stop()


# --- the command -------------------------------------------------------------------------------


def test_cli_one_line_errors(checkpoint, tmp_path):
    runner = CliRunner()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        bad_template = tmp_path / "t.json"
        bad_template.write_text('{"message": "{user}"}')
        cases = [
            (["serve", str(checkpoint), "--port", str(port)], "already in use"),
            (["serve", str(tmp_path / "nothing")], "checkpoint not found"),
            (["serve", str(checkpoint), "--port", "70000"], "--port must be in"),
            (["serve", str(checkpoint), "--chat-template", str(bad_template)], "unknown field {user}"),
            (["serve", str(checkpoint), "--max-batch-size", "0", "--port", "0"], "--max-batch-size"),
            (["serve", str(checkpoint), "--threads", "0"], "--threads must be at least 1"),
        ]
        for args, message in cases:
            result = runner.invoke(cli_app, args)
            assert result.exit_code == 2, (args, result.output)
            assert result.stderr.startswith("error: ") and message in result.stderr, (args, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1
    finally:
        busy.close()
    result = runner.invoke(cli_app, ["serve", "--help"])
    assert "LLMCLI_API_KEY" in result.stdout and "base models" in result.stdout


def test_an_engine_failure_is_a_500_and_the_server_recovers(server, client):
    def broken_step():
        raise RuntimeError("boom")

    server.state.engine.generator.step = broken_step  # the engine replaces its generator after a failure
    with pytest.raises(openai.InternalServerError):
        complete(client, "ROMEO:", max_tokens=4)
    assert complete(client, "ROMEO:", max_tokens=4).choices[0].text
    server.wait_idle()


def test_the_command_serves_until_ctrl_c(checkpoint, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", str(checkpoint), "--port", "0",
                                 "--threads", "1"], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "LLMCLI_API_KEY": "k"})
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            found = [w for w in log_path.read_text().split() if w.startswith("http://127.0.0.1:")]
            url = found[0].removesuffix("/v1") if found else None
            time.sleep(0.05)
        assert "API key required" in log_path.read_text()
        got = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=TIMEOUT).completions.create(
            model=MODEL, prompt="ROMEO:", max_tokens=3, temperature=0)  # greedy: never an EOT-first sample
        assert got.choices[0].text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
