"""Continuous batching over HTTP: 16 concurrent clients vs the same 16 requests one after another.

    python benchmarks/bench_serve.py                      # a random 4-layer, 128-wide char model
    python benchmarks/bench_serve.py runs/char/best       # a trained run instead
    python benchmarks/bench_serve.py --clients 8 --tokens 128 --repeat 1 --server-threads 0

Starts `llmcli serve` as a subprocess on a free 127.0.0.1 port and streams greedy completions
(`ignore_eos`, so each is exactly --tokens long) from an asyncio client in this process. Reports,
for each mode, the aggregate generated tokens per second (all tokens / wall time from the first
request sent to the last one finished), time to first token and request latency (p50 and p95,
nearest rank), and the throughput ratio concurrent / sequential measured in the same run. Each
mode runs --repeat times and the run with the median throughput is shown. The concurrent texts
must equal the sequential ones (greedy decoding is batch-invariant); the script says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ratios, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def make_model(directory: Path) -> Path:
    """A random 4-layer, 128-wide GPT-2-style model with a char tokenizer over data/sample.txt."""
    import torch

    from llmcli.checkpoint import write_checkpoint
    from llmcli.config import Config, ModelConfig, TokenizerConfig
    from llmcli.models.transformer import Transformer
    from llmcli.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(TokenizerConfig(kind="char"), [(REPO / "data" / "sample.txt").read_text()])
    save_tokenizer(tok, directory / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=4, n_head=4, d_model=128, block_size=256,
                                    vocab_size=tok.get_vocab_size())).eval()
    write_checkpoint(directory / "bench-model", model, Config(model=model.config),
                     (directory / "tokenizer.json").read_bytes(), {"step": 0})
    return directory / "bench-model"


def start_server(run_dir: Path, batch: int, threads: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    log = open(log_path, "w")
    extra = ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", str(run_dir), "--port", "0",
                             "--max-batch-size", str(batch), "--model-name", "bench", *extra],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LLMCLI_API_KEY": ""})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log_path.read_text())
        if match:
            url = match.group(1)
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, text, usage = None, [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice["text"]:
                    if first is None:
                        first = time.perf_counter()
                    text.append(choice["text"])
    ended = time.perf_counter()
    return {"started": started, "ttft": (first or ended) - started, "latency": ended - started,
            "ended": ended, "tokens": usage["completion_tokens"] if usage else 0, "text": "".join(text)}


async def run_mode(url: str, prompts: list[str], tokens: int, concurrent: bool) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await one_request(client, url, prompts[0], 4)  # warm the connection and the model
        started = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, url, p, tokens) for p in prompts))
        else:
            results = [await one_request(client, url, p, tokens) for p in prompts]
        wall = time.perf_counter() - started
    total = sum(r["tokens"] for r in results)
    return {"wall": wall, "tokens": total, "tok_s": total / wall, "ttft": [r["ttft"] for r in results],
            "latency": [r["latency"] for r in results], "texts": [r["text"] for r in results]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", type=Path, help="run or checkpoint directory (default: a random "
                                                              "4-layer, 128-wide char model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode (the median one is shown)")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="the server's --threads (0 = PyTorch's default, one per core). 1 by default: "
                             "on a 2-core machine the server's event loop and this client need the other")
    args = parser.parse_args()

    lines = [line.strip() for line in (REPO / "data" / "sample.txt").read_text().splitlines() if line.strip()]
    prompts = [line[:24] for line in lines[:args.clients]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run_dir = args.run_dir or make_model(tmp_path)
        proc, url = start_server(run_dir, args.clients, args.server_threads, tmp_path / "server.log")
        try:
            runs = {"sequential": [], "concurrent": []}
            for _ in range(args.repeat):
                for mode in runs:
                    runs[mode].append(asyncio.run(run_mode(url, prompts, args.tokens, mode == "concurrent")))
        finally:
            stop_server(proc)
    shown = {mode: sorted(r, key=lambda x: x["tok_s"])[len(r) // 2] for mode, r in runs.items()}
    rows = []
    for mode, r in shown.items():
        rows.append([f"{mode} ({args.clients} requests)", r["tokens"], r["wall"], r["tok_s"],
                     percentile(r["ttft"], 50) * 1000, percentile(r["ttft"], 95) * 1000,
                     percentile(r["latency"], 50) * 1000, percentile(r["latency"], 95) * 1000])
    table(f"llmcli serve: {args.clients} greedy requests of {args.tokens} tokens, "
          f"{'random 4x128 model' if args.run_dir is None else args.run_dir}, server threads "
          f"{args.server_threads or 'default'} (the run with the median throughput of {args.repeat})",
          ["mode", "tokens", "wall s", "tok/s", "TTFT p50 ms", "TTFT p95 ms", "latency p50 ms", "latency p95 ms"],
          rows)
    same = all(r["texts"] == runs["sequential"][0]["texts"] for rs in runs.values() for r in rs)
    ratio = ratios([r["tok_s"] for r in runs["concurrent"]], [r["tok_s"] for r in runs["sequential"]])
    print(f"throughput ratio concurrent / sequential, median (min-max) of {args.repeat} rounds: {ratio}x "
          "(target >= 4x)")
    print(f"concurrent outputs identical to sequential: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
