"""Chunked prefill over HTTP: the inter-token latency of 64 running streams while a 2,000-token
prompt arrives, with chunked prefill (a couple of step budgets) and without.

    python benchmarks/bench_chunked_prefill.py                          # a random 4x128 char model, context 2,304
    python benchmarks/bench_chunked_prefill.py --budgets 512 256 --rounds 3 --tokens 256
    python benchmarks/bench_chunked_prefill.py --server-arg=--slot-cache     # full-context slots, not paged

Starts one `llmcli serve` subprocess per configuration (batch = --clients + 1, 1 thread; the
decode step compiled and warmed up before the server answers): `--max-num-batched-tokens B` for
each budget B, and "whole" with a budget over the long prompt plus every decode (so that prompt is
prefilled in one step, as without chunked prefill). In each round, for each configuration in turn
(interleaved; after one short rehearsal round each, not measured), --clients greedy streams (`ignore_eos`, --tokens each) start together; once every
stream has a quarter of its tokens, one more client sends a --long-prompt-token prompt (a different
stretch of text every time, so the prefix cache never holds it). Reported for the running streams:
inter-token latency (the gaps between a stream's consecutive chunks) p50 / p95 / max over the whole
run, and in the window from the long prompt's arrival to its first token (every gap that overlaps
it); and the long request's time to first token. Medians (min-max) over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import percentile, start_server, stop_server
from common import Spread, table

REPO = Path(__file__).resolve().parent.parent
CONTEXT = 2304  # holds the 2,000-token prompt and what it generates


def make_model(directory: Path) -> Path:
    """A random 4-layer, 128-wide GPT-2-style model, context CONTEXT, char tokenizer over data/sample.txt."""
    import torch

    from llmcli.checkpoint import write_checkpoint
    from llmcli.config import Config, ModelConfig, TokenizerConfig
    from llmcli.models.transformer import Transformer
    from llmcli.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(TokenizerConfig(kind="char"), [(REPO / "data" / "sample.txt").read_text()])
    save_tokenizer(tok, directory / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=4, n_head=4, d_model=128, block_size=CONTEXT,
                                    vocab_size=tok.get_vocab_size())).eval()
    write_checkpoint(directory / "bench-model", model, Config(model=model.config),
                     (directory / "tokenizer.json").read_bytes(), {"step": 0})
    return directory / "bench-model"


async def stream(client: httpx.AsyncClient, url: str, prompt: str, tokens: int, times: list[float]) -> None:
    """One greedy streaming completion; appends the arrival time of every chunk with text to `times`."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if any(choice["text"] for choice in json.loads(line[6:])["choices"]):
                    times.append(time.perf_counter())


async def one_round(url: str, prompts: list[str], tokens: int, long_prompt: str) -> dict:
    """The streams, the long prompt once they are a quarter through, and what each saw."""
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await stream(client, url, prompts[0], 4, [])  # warm the connection
        times: list[list[float]] = [[] for _ in prompts]
        streams = [asyncio.create_task(stream(client, url, p, tokens, t)) for p, t in zip(prompts, times, strict=True)]
        while min(map(len, times)) < tokens // 4:
            await asyncio.sleep(0.002)
        long_times: list[float] = []
        sent = time.perf_counter()
        await stream(client, url, long_prompt, 8, long_times)
        await asyncio.gather(*streams)
    first = long_times[0]
    gaps = [gap for t in times for gap in itertools.pairwise(t)]
    return {"itl": [b - a for a, b in gaps], "window": [b - a for a, b in gaps if b > sent and a < first],
            "ttft": first - sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="running streams")
    parser.add_argument("--tokens", type=int, default=256, help="tokens each stream generates")
    parser.add_argument("--long-prompt-tokens", type=int, default=2000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 256],
                        help="--max-num-batched-tokens of the chunked configurations")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--server-arg", action="append", default=[], metavar="OPTION",
                        help="one more `llmcli serve` option for every configuration (repeatable), "
                             "e.g. --server-arg=--slot-cache")
    args = parser.parse_args()

    text = (REPO / "data" / "sample.txt").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    prompts = [line[:24] for line in lines[:args.clients]]
    whole = 1 << math.ceil(math.log2(args.long_prompt_tokens + args.clients + 1))  # the prompt in one step
    configs = {f"whole (budget {whole})": whole, **{f"chunked, budget {b}": b for b in args.budgets}}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run_dir = make_model(tmp_path)
        servers = {}
        try:
            for i, (name, budget) in enumerate(configs.items()):
                servers[name] = start_server(run_dir, args.clients + 1, 1, tmp_path / f"server-{i}.log",
                                             "--max-num-batched-tokens", str(budget), *args.server_arg)
                warmed = [ln for ln in (tmp_path / f"server-{i}.log").read_text().splitlines() if "compiled decode" in ln]
                print(f"{name}: {warmed[0] if warmed else 'no compiled decode step'}", flush=True)
            for name in configs:  # a rehearsal, not measured: first-use costs of new shapes (oneDNN's kernels)
                asyncio.run(one_round(servers[name][1], prompts, 32, (text * 2)[500:500 + args.long_prompt_tokens]))
            runs = 0
            for _ in range(args.rounds):
                for name in configs:
                    start = (runs * 997) % len(text)  # a stretch no earlier run sent
                    long_prompt = (text * 2)[start:start + args.long_prompt_tokens]
                    runs += 1
                    results[name].append(asyncio.run(one_round(servers[name][1], prompts, args.tokens, long_prompt)))
        finally:
            for proc, _ in servers.values():
                stop_server(proc)

    def ms(name: str, key: str, q: float | None) -> Spread:
        return Spread.of([1000 * (percentile(r[key], q) if q is not None else max(r[key])) for r in results[name]])

    rows = [[name, ms(name, "itl", 50), ms(name, "itl", 95), ms(name, "itl", None), ms(name, "window", 50),
             ms(name, "window", 95), ms(name, "window", None), Spread.of([1000 * r["ttft"] for r in results[name]])]
            for name in configs]
    table(f"llmcli serve: {args.clients} greedy streams of {args.tokens} tokens, one {args.long_prompt_tokens}-token "
          f"prompt arriving once they are a quarter through; random 4x128 char model, context {CONTEXT}, 1 server "
          f"thread{''.join(' ' + a for a in args.server_arg)}; ms, median (min-max) of {args.rounds} interleaved rounds",
          ["prefill of the long prompt", "ITL p50", "ITL p95", "ITL max", "window p50", "window p95", "window max",
           "long prompt TTFT"], rows)
    base = [percentile(r["window"], 95) for r in results[next(iter(configs))]]
    for name in list(configs)[1:]:
        ratio = Spread.of([b / percentile(r["window"], 95) for b, r in zip(base, results[name], strict=True)])
        print(f"window ITL p95, whole / {name}: {ratio}x")


if __name__ == "__main__":
    main()
