"""Continuous batching over HTTP: 64 concurrent streaming clients vs the same 64 requests one after another.

    python benchmarks/bench_serve.py                      # a random 4-layer, 128-wide char model
    python benchmarks/bench_serve.py runs/char/best       # a trained run instead
    python benchmarks/bench_serve.py --clients 16 --tokens-max 64 --repeat 1 --server-threads 0

Starts `llmcli serve` as a subprocess on a free 127.0.0.1 port (batch = --clients) and streams
greedy completions (`ignore_eos`, so request i is exactly its length long: lengths spread evenly
over --tokens..--tokens-max) from an asyncio client in this process. Reports, for each mode, the
aggregate generated tokens per second (all tokens / wall time from the first request sent to the
last one finished), time to first token, inter-token latency (the gaps between a stream's
consecutive chunks, pooled over the streams) and request latency (p50 and p95, nearest rank), and
the throughput ratio concurrent / sequential of each round. The modes run in interleaved rounds
(--repeat) and the round with the median throughput is shown. The concurrent texts must equal the
sequential ones (greedy decoding is batch-invariant); the script says so.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
from common import ratios, table

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


def start_server(run_dir: Path, batch: int, threads: int, log_path: Path,
                 *options: str) -> tuple[subprocess.Popen, str]:
    """`llmcli serve` with more `options`; (process, base url) once /health answers."""
    log = open(log_path, "w")
    extra = ["--threads", str(threads)] if threads else []
    without_api_key = {name: value for name, value in os.environ.items() if name != "LLMCLI_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", str(run_dir), "--port", "0",
                             "--max-batch-size", str(batch), "--model-name", "bench", *extra, *options],
                            stdout=log, stderr=subprocess.STDOUT, env=without_api_key)
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
    times, text, usage = [], [], None
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
                    times.append(time.perf_counter())
                    text.append(choice["text"])
    ended = time.perf_counter()
    return {"started": started, "ttft": (times[0] if times else ended) - started, "latency": ended - started,
            "itl": [b - a for a, b in itertools.pairwise(times)], "ended": ended,
            "tokens": usage["completion_tokens"] if usage else 0, "text": "".join(text)}


async def run_mode(url: str, prompts: list[str], lengths: list[int], concurrent: bool) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await one_request(client, url, prompts[0], 4)  # warm the connection and the model
        started = time.perf_counter()
        requests = [(p, n) for p, n in zip(prompts, lengths, strict=True)]
        if concurrent:
            results = await asyncio.gather(*(one_request(client, url, p, n) for p, n in requests))
        else:
            results = [await one_request(client, url, p, n) for p, n in requests]
        wall = time.perf_counter() - started
    total = sum(r["tokens"] for r in results)
    return {"wall": wall, "tokens": total, "tok_s": total / wall, "ttft": [r["ttft"] for r in results],
            "itl": [gap for r in results for gap in r["itl"]], "latency": [r["latency"] for r in results],
            "texts": [r["text"] for r in results]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", type=Path, help="run or checkpoint directory (default: a random "
                                                              "4-layer, 128-wide char model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated by the shortest request")
    parser.add_argument("--tokens-max", type=int, default=128, help="tokens generated by the longest request")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (the median one is shown)")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="the server's --threads (0 = PyTorch's default, one per core). 1 by default: "
                             "on a 2-core machine the server's event loop and this client need the other")
    args = parser.parse_args()

    lines = [line.strip() for line in (REPO / "data" / "sample.txt").read_text().splitlines() if line.strip()]
    prompts = [line[:24] for line in lines[:args.clients]]
    spread = max(0, args.tokens_max - args.tokens)
    lengths = [args.tokens + (i * spread // max(1, args.clients - 1)) for i in range(args.clients)]
    order = sorted(range(args.clients), key=lambda i: (i * 37) % args.clients)  # lengths mixed, not sorted
    lengths = [lengths[i] for i in order]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run_dir = args.run_dir or make_model(tmp_path)
        proc, url = start_server(run_dir, args.clients, args.server_threads, tmp_path / "server.log")
        try:
            runs = {"sequential": [], "concurrent": []}
            for _ in range(args.repeat):
                for mode in runs:
                    runs[mode].append(asyncio.run(run_mode(url, prompts, lengths, mode == "concurrent")))
        finally:
            stop_server(proc)
    shown = {mode: sorted(r, key=lambda x: x["tok_s"])[len(r) // 2] for mode, r in runs.items()}
    rows = []
    for mode, r in shown.items():
        rows.append([f"{mode} ({args.clients} requests)", r["tokens"], r["wall"], r["tok_s"],
                     *(percentile(r[key], q) * 1000 for key in ("ttft", "itl", "latency") for q in (50, 95))])
    table(f"llmcli serve: {args.clients} greedy streaming requests of {args.tokens}-{args.tokens_max} tokens, "
          f"{'random 4x128 model' if args.run_dir is None else args.run_dir}, server threads "
          f"{args.server_threads or 'default'} (the round with the median throughput of {args.repeat})",
          ["mode", "tokens", "wall s", "tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms",
           "latency p50 ms", "latency p95 ms"], rows)
    same = all(r["texts"] == runs["sequential"][0]["texts"] for rs in runs.values() for r in rs)
    ratio = ratios([r["tok_s"] for r in runs["concurrent"]], [r["tok_s"] for r in runs["sequential"]])
    print(f"throughput ratio concurrent / sequential, median (min-max) of {args.repeat} rounds: {ratio}x "
          "(target >= 4x)")
    print(f"concurrent outputs identical to sequential: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
