"""The `llmcli serve` command: one-line errors, and a real process serving until Ctrl-C."""

import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch._dynamo.utils import counters

from llmcli.load import load_checkpoint
from llmcli.options.inference import EngineOptions

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def test_cli_one_line_errors(checkpoint, tmp_path, cli, one_line_error):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        bad_template = tmp_path / "t.json"
        bad_template.write_text('{"message": "{user}"}')
        cases = [
            ((checkpoint, "--port", port), "already in use"),
            ((tmp_path / "nothing",), "checkpoint not found"),
            ((checkpoint, "--port", "70000"), "--port must be in"),
            ((checkpoint, "--chat-template", bad_template), "unknown field {user}"),
            ((checkpoint, "--max-batch-size", "0", "--port", "0"), "--max-batch-size"),
            ((checkpoint, "--threads", "0"), "--threads must be at least 1"),
            ((checkpoint, "--kv-cache-memory", "lots"), "--kv-cache-memory must be a size such as 2GiB"),
            ((checkpoint, "--kv-cache-memory", "0MiB"), "--kv-cache-memory must be a size"),
            ((checkpoint, "--kv-cache-memory", "100", "--port", "0"), "--kv-cache-memory 100 holds no block"),
            ((checkpoint, "--num-blocks", "4", "--kv-cache-memory", "1GiB"), "give one"),
            ((checkpoint, "--slot-cache", "--no-prefix-cache"), "--slot-cache gives each sequence a full-context slot"),
            ((checkpoint, "--block-size", "0"), "--block-size must be at least 1"),
            ((checkpoint, "--engine", "vllm", "--num-blocks", "8"), "--engine vllm pages its KV cache with its own"),
        ]
        for args, message in cases:
            one_line_error(cli("serve", *args), message, alone=True)
    finally:
        busy.close()
    result = cli("serve", "--help")
    assert "LLMCLI_API_KEY" in result.stdout and "base models" in result.stdout


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_refused_however_it_is_given(tmp_path, cli, one_line_error, monkeypatch, key):
    """An empty key is a mistake (an unset $VARIABLE), never "no key": both spellings are refused,
    before the checkpoint is read."""
    missing = tmp_path / "no-run"
    one_line_error(cli("serve", missing, "--api-key", key), "--api-key / LLMCLI_API_KEY is empty", alone=True)
    monkeypatch.setenv("LLMCLI_API_KEY", key)
    one_line_error(cli("serve", missing), "--api-key / LLMCLI_API_KEY is empty", alone=True)
    monkeypatch.delenv("LLMCLI_API_KEY")
    one_line_error(cli("serve", missing), "checkpoint not found", alone=True)  # unset: no key


def test_the_command_serves_until_ctrl_c(checkpoint, serve_process):
    proc, url, log_path = serve_process(checkpoint, env={"LLMCLI_API_KEY": "k\n"})  # an env file can leave the newline
    assert "API key required" in log_path.read_text()
    assert "KV cache 64 blocks of 16 tokens, prefix caching on" in log_path.read_text()  # 16 x 64/16
    # --compile auto compiles a transformer's decode step for every batch shape before serving
    assert re.search(r"compiled decode for batch 1, 2, 4, 8, 16 in \d+\.\d s \(inductor cache: (warm|cold|partly warm)\)",
                     log_path.read_text())
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=20)
    got = client.completions.create(model=checkpoint.name, prompt="ROMEO:", max_tokens=3,
                                    temperature=0)  # greedy: never an EOT-first sample
    assert got.choices[0].text
    # Ctrl-C during a long request: it finishes; new requests get 503 (not a refused connection).
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(client.completions.create, model=checkpoint.name, prompt="ROMEO:", max_tokens=1500,
                           temperature=0, extra_body={"ignore_eos": True})
        deadline = time.monotonic() + 20
        while httpx.get(url + "/health", timeout=5).json()["in_flight"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 20
        while httpx.get(url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer k"},
                             timeout=5)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert long.result(timeout=30).usage.completion_tokens == 1500
    assert proc.wait(20) == 0


@pytest.mark.slow
def test_a_compiled_server_answers_its_first_requests_without_compiling(make_char_checkpoint, corpus_text, tmp_path,
                                                                       running_class, complete, capsys):
    # A context no other test uses: a decode graph this process has not compiled yet.
    loaded = load_checkpoint(make_char_checkpoint(tmp_path / "warm", corpus_text, 56, std=0.15))
    server = running_class(loaded.model, loaded.tokenizer, warm_up=True, max_batch_size=2,
                            steps=EngineOptions(compile="on"))
    try:
        assert re.search(r"compiled decode for batch 1, 2 in \d+\.\d s \(inductor cache: (warm|cold|partly warm)\)",
                         capsys.readouterr().err)
        # The warm-up may find graphs dynamo already holds from earlier engines of these shapes (the
        # count then stays, as seen in the whole suite); what matters: serving compiles nothing more.
        warmed = counters["frames"]["ok"]
        client = server.client()
        assert complete(client, "ROMEO:", max_tokens=5).usage.completion_tokens == 5  # batch 1
        with ThreadPoolExecutor(2) as pool:  # batch 2
            both = list(pool.map(lambda p: complete(client, p, max_tokens=20, extra_body={"ignore_eos": True}),
                                 ["ROMEO:", "All:"]))
        assert [r.usage.completion_tokens for r in both] == [20, 20]
        assert counters["frames"]["ok"] == warmed
    finally:
        server.stop()


def test_memory_budgets_become_blocks(loaded, tiny_recurrent):
    from llmcli.errors import UserError
    from llmcli.options.inference import ServeOptions, parse_size
    from llmcli.serve.server import cache_options

    model = loaded[0]
    assert [parse_size(s) for s in ("2GiB", "512MiB", "1.5GB", "4096", "64 kib", "2 GiBs")] == \
        [2 << 30, 512 << 20, 1_500_000_000, 4096, 64 << 10, None]
    per_token = model.kv_bytes_per_token(next(model.parameters()).dtype)
    assert per_token == 2 * 2 * 32 * 4  # keys and values, 2 layers, 32 wide, float32

    def options(**fields):
        return cache_options(model, ServeOptions(run_dir="x", **fields))

    assert options() == {"kv_blocks": 16 * 4, "block_len": 16, "prefix_cache": True}
    assert options(kv_cache_memory="1MiB", block_tokens=8)["kv_blocks"] == (1 << 20) // (8 * per_token)
    assert options(num_blocks=5, no_prefix_cache=True) == {"kv_blocks": 5, "block_len": 16, "prefix_cache": False}
    assert options(slot_cache=True) == {}
    recurrent = tiny_recurrent("lstm", 40)
    assert cache_options(recurrent, ServeOptions(run_dir="x")) == {}
    with pytest.raises(UserError, match="model.arch=lstm has no paged KV cache"):
        cache_options(recurrent, ServeOptions(run_dir="x", num_blocks=8))
