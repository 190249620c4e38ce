"""HTTP behaviour through a running server: completions, streaming, batching, load, keys, failures."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llmcli.load import load_checkpoint  # noqa: E402
from llmcli.options.checkpoints import QuantizeOptions  # noqa: E402

# --- the happy paths ---------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    health = server.health()
    assert health["status"] == "ok" and health["model"] == server.model and health["max_batch_size"] == 4


def test_greedy_completion_equals_llmcli_generate(server, client, checkpoint, cli, complete):
    prompts = ["ROMEO:", "All: Speak", "Before we proceed " * 8]  # the last is longer than the context
    result = cli("generate", checkpoint, "--lines", "--json", "-n", "30", "--temperature", "0",
                 input="\n".join(prompts) + "\n")
    assert result.exit_code == 0, result.output
    expected = [json.loads(line)["completion"] for line in result.stdout.splitlines()]
    result = cli("generate", checkpoint, "", "--json", "-n", "30", "--temperature", "0")
    assert result.exit_code == 0, result.output
    prompts.append("")  # from <|endoftext|>
    expected.append(json.loads(result.stdout)["completion"])
    for prompt, want in zip(prompts, expected, strict=True):
        got = complete(client, prompt, max_tokens=30)
        (choice,) = got.choices
        assert choice.text == want
        assert choice.finish_reason in ("stop", "length") and got.object == "text_completion"
        assert got.id.startswith("cmpl-") and got.model == server.model
        assert got.usage.prompt_tokens == min(max(len(prompt), 1), server.block)  # char tokenizer: a token a char
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        assert 1 <= got.usage.completion_tokens <= 30


def test_streaming_reassembles_to_the_same_text(server, client, complete):
    whole = complete(client, "ROMEO:", max_tokens=40, extra_body={"ignore_eos": True})
    chunks = list(complete(client, "ROMEO:", max_tokens=40, stream=True, extra_body={"ignore_eos": True},
                           stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(text) == 40
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40

    messages = [{"role": "user", "content": "Speak"}]
    chat = client.chat.completions.create(model=server.model, messages=messages, max_tokens=30, temperature=0)
    stream = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=30,
                                                 temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert chat.object == "chat.completion" and stream[0].object == "chat.completion.chunk"


def test_stop_strings_cut_exactly(client, complete):
    free = complete(client, "ROMEO:", max_tokens=40, extra_body={"ignore_eos": True}).choices[0].text
    stop = free[12:15]
    cut = complete(client, "ROMEO:", max_tokens=40, stop=stop, extra_body={"ignore_eos": True})
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = complete(client, "ROMEO:", max_tokens=40, stop=[stop, "zzz"], stream=True,
                        extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == free[:free.index(stop)]


def test_n_seeds_and_prompt_lists(client, complete):
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


def test_sixteen_concurrent_greedy_requests_equal_their_sequential_results(server, client, complete,
                                                                           corpus_text):
    prompts = [corpus_text[i * 7:i * 7 + 3 + i] for i in range(16)]
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


def test_a_prompt_longer_than_the_context_is_truncated_not_an_error(server, client, complete):
    long = "Speak, speak. " * 400  # 5600 characters: tokenized off the event loop
    got = complete(client, long, max_tokens=10, extra_body={"ignore_eos": True})
    assert got.usage.prompt_tokens == server.block and len(got.choices[0].text) == 10
    tail = complete(client, long[-server.block:], max_tokens=10, extra_body={"ignore_eos": True})
    assert tail.choices[0].text == got.choices[0].text
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": long}],
                                          max_tokens=5, temperature=0)
    assert chat.usage.prompt_tokens == server.block


# --- load, keys, failures ----------------------------------------------------------------------


def test_api_key(start_server, complete, error_of):
    running = start_server(api_key="sekrit")
    for key in ("wrong", "sekrit2"):
        with pytest.raises(openai.AuthenticationError) as info:
            complete(running.client(key), "ROMEO:", max_tokens=2)
        assert info.value.body["code"] == "invalid_api_key"
    response = running.get("/v1/models")
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    assert running.get("/v1/nope").status_code == 401  # no route probing
    assert complete(running.client("sekrit"), "ROMEO:", max_tokens=2).choices[0].text
    assert running.health()["status"] == "ok"  # /health needs no key


def test_a_full_queue_is_429_and_shutting_down_is_503(start_server, complete, error_of):
    running = start_server(max_batch_size=1, max_queue=1)
    # The engine's first step waits for `gate`: both requests are admitted (1 slot + 1 queued) and
    # none can finish, so the server stays full until the test opens the gate.
    gate = threading.Event()
    generator = running.state.engine.generator
    step = generator.step

    def gated_step():
        gate.wait()
        return step()

    generator.step = gated_step
    try:
        with ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(complete, running.client(), p, max_tokens=5) for p in ("All:", "ROMEO:")]
            running.wait_for(lambda h: h["in_flight"] >= 2, "both requests in flight")
            response = running.post("/v1/completions", {"prompt": "a"})
            assert response.status_code == 429 and response.headers["retry-after"]
            assert error_of(response)["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                complete(running.client(), "a", max_tokens=2)
            gate.set()
            assert all(f.result(timeout=20).choices[0].text for f in pending)
        running.wait_idle()
        running.state.begin_shutdown()
        response = running.post("/v1/completions", {"prompt": "a"})
        assert response.status_code == 503 and error_of(response)["type"] == "server_error"
        assert running.get("/health").status_code == 503
    finally:
        gate.set()


def test_client_disconnects_cancel_their_sequences(server, client, complete):
    server.wait_idle()
    before = server.health()["generated_tokens"]
    body = {"prompt": "ROMEO:", "max_tokens": 60000, "ignore_eos": True, "stream": True}
    with server.http() as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for _, line in zip(range(6), lines, strict=False) if line.startswith("data:")]
            assert len(received) >= 2
    # The connection is closed: the sequence must leave the batch long before 60000 tokens.
    health = server.wait_idle()
    assert health["generated_tokens"] - before < 30000

    before = health["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        server.post("/v1/completions", {**body, "stream": False}, timeout=0.5)
    health = server.wait_idle()
    assert health["generated_tokens"] - before < 30000
    assert complete(client, "ROMEO:", max_tokens=4).choices[0].text  # the slot is free again


def test_quantized_checkpoints_serve_like_any_other(checkpoint, tmp_path, start_server):
    from llmcli.quantize.command import quantize_checkpoint

    out = tmp_path / "int8"
    quantize_checkpoint(QuantizeOptions(run_dir=checkpoint, out=out, method="int8", eval_tokens=0,
                                        decode_tokens=0))
    loaded = load_checkpoint(out)
    model, tokenizer = loaded.model, loaded.tokenizer
    running = start_server(model, tokenizer, model_name="int8")
    got = running.client().completions.create(model="int8", prompt="ROMEO:", max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert len(got.choices[0].text) == 8


def test_an_engine_failure_is_a_500_and_the_server_recovers(server, client, complete):
    def broken_step():
        raise RuntimeError("boom")

    server.state.engine.generator.step = broken_step  # the engine replaces its generator after a failure
    with pytest.raises(openai.InternalServerError):
        complete(client, "ROMEO:", max_tokens=4)
    assert complete(client, "ROMEO:", max_tokens=4).choices[0].text
    server.wait_idle()


def test_a_recurrent_model_serves_with_its_whole_history(loaded, tiny_recurrent, start_server, corpus_text):
    """An LSTM: no context limit (a long prompt is not truncated), concurrent greedy requests equal
    sequential ones, and streaming reassembles to the same text."""
    tokenizer = loaded[1]
    running = start_server(tiny_recurrent("lstm", tokenizer.get_vocab_size(), std=0.3), tokenizer,
                           model_name="lstm", max_batch_size=3)
    client = running.client()
    assert running.health()["max_batch_size"] == 3

    def run(prompt: str, stream: bool = False) -> tuple[str, int]:
        kwargs = dict(model="lstm", prompt=prompt, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs)), 0
        done = client.completions.create(**kwargs)
        assert done.usage.completion_tokens == 20
        return done.choices[0].text, done.usage.prompt_tokens

    long = corpus_text * 2  # far longer than any transformer context here
    assert run(long)[1] == len(long)
    prompts = [corpus_text[i * 5:i * 5 + 2 + i] for i in range(8)]
    sequential = [run(p)[0] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, prompts, timeout=60)) == [(t, len(p)) for t, p in zip(sequential, prompts, strict=True)]
    assert run(prompts[3], stream=True)[0] == sequential[3]


def test_a_prompt_the_paged_cache_cannot_hold_is_a_400_and_others_are_served(start_server, complete, error_of,
                                                                              corpus_text):
    running = start_server(max_batch_size=2, num_blocks=3, block_tokens=4)  # 12 tokens in all
    assert running.health()["kv_cache"]["blocks"] == 3
    for stream in (False, True):
        response = running.post("/v1/completions", {"prompt": corpus_text[:13], "max_tokens": 2, "stream": stream})
        assert response.status_code == 400
        error = error_of(response)
        assert error["code"] == "prompt_too_long" and "holds at most 12" in error["message"]
    client = running.client()
    # Two sequences that outgrow the pool together: one waits (preempted), both finish.
    outs = [complete(client, corpus_text[:6], max_tokens=20, n=2, extra_body={"ignore_eos": True})]
    assert [len(c.text) for c in outs[0].choices] == [20, 20] and outs[0].choices[0].text == outs[0].choices[1].text
    assert running.health()["kv_cache"]["preemptions"] > 0
