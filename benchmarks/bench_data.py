"""Data preparation at scale: `llmcli data prepare` against plain HF `tokenizers` on the same text.

    python benchmarks/bench_data.py                        # 50 MB, 500 MB and 2 GB corpora (about an hour)
    python benchmarks/bench_data.py --sizes 50 --rounds 3  # the quick table

Each corpus is one `.txt` file of Shakespeare passages (20 lines of a play at a time, drawn with a
fixed seed from the shipped plays, until the size is reached), written under --dir and deleted at
the end. For char, word (8k) and byte-level BPE (8k), each round runs, in fresh processes,

* `llmcli data prepare` end to end (scan, tokenizer, encode into shards; data.num_proc = the cores),
  its peak memory (PSS summed over its processes, sampled every 50 ms; the tokenizer's: before the
  worker processes start) and its phases' times from meta.json;
* plain `tokenizers`: the same kind of tokenizer trained with `train_from_iterator` over batches
  of 1,000 lines of the same training text (the 90% our split trains on), then `encode_batch`
  over batches of 1,000 lines of the corpus (both cores through its Rust thread pool; its rate is
  measured on the first 256 MB at most, so the 2 GB run ends within the hour).

Rounds alternate the two. Then, on the largest corpus, `llmcli train` for --train-seconds on the
BPE shards against the same model on the 5 MB Shakespeare BPE cache (tokens/s from metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Spread, ratios, table

REPO = Path(__file__).resolve().parent.parent
KINDS = {"char": [], "word": ["tokenizer.vocab_size=8000"], "bpe": ["tokenizer.vocab_size=8000"]}
PASSAGE_LINES = 20
ENCODE_CHARS = 256 * 10**6  # plain encode_batch's rate is measured on the corpus's first 256 MB at most


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """Shakespeare passages drawn with a fixed seed until the file holds `megabytes` MB."""
    from llmcli.data.shakespeare import markdown_to_text, shakespeare_plays

    lines = [line + "\n" for p in shakespeare_plays().values() for line in markdown_to_text(p.read_text()).splitlines()]
    passages = ["".join(lines[i:i + PASSAGE_LINES]).encode() for i in range(0, len(lines), PASSAGE_LINES)]
    rng, want, written = random.Random(seed), megabytes * 10**6, 0
    with open(path, "wb") as fh:
        while written < want:
            passage = passages[rng.randrange(len(passages))][: want - written]
            fh.write(passage)
            written += len(passage)


def peak_memory(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, peak memory of the process and its children, peak before its first child) of `cmd`.

    Memory is PSS summed over the processes (shared pages split among them: forked workers share
    the parent's), sampled every 50 ms; before the encoder's worker processes start, the parent alone
    scans the corpus and trains the tokenizer."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak, alone = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
            total = sum(p.memory_full_info().pss for p in family)
            peak = max(peak, total)
            if len(family) == 1:
                alone = max(alone, total)
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr.read()[-2000:]}")
    return seconds, peak, alone


def run_ours(corpus: Path, kind: str, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "llmcli"), "data", "prepare", f"data.source={corpus}",
           f"data.cache_dir={cache}", f"tokenizer.kind={kind}", *KINDS[kind]]
    seconds, peak, train_rss = peak_memory(cmd)
    meta = json.loads(next(cache.glob("*/meta.json")).read_text())
    t = meta["timings"]
    nbytes = sum(s["bytes"] for s in meta["splits"].values())
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": seconds, "peak": peak, "train_s": t["tokenizer_s"], "train_rss": train_rss,
            "encode_mbs": nbytes / 1e6 / t["encode_s"], "train_chars": meta["splits"]["train"]["characters"],
            "tokens": sum(s["tokens"] for s in meta["splits"].values())}


PLAIN = r'''
import json, sys, time
sys.path.insert(0, {repo!r})
from llmcli.config import TokenizerConfig
from llmcli.tokenizer import untrained
from tokenizers import AddedToken, pre_tokenizers, trainers
kind, path, train_chars, encode_chars = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
vocab = 8000
def lines(limit=None):
    seen, batch = 0, []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and seen >= limit:
                break
            seen += len(line)
            batch.append(line)
            if len(batch) == 1000:
                yield batch
                batch = []
    if batch:
        yield batch
tok = untrained(TokenizerConfig(kind=kind))
if kind == "bpe":
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
else:
    trainer = trainers.WordLevelTrainer(vocab_size=vocab + 2 if kind == "word" else 10**6, min_frequency=1 if kind == "char" else 2,
                                        special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
start = time.perf_counter()
tok.train_from_iterator(lines(train_chars), trainer=trainer)
trained = time.perf_counter()
print(json.dumps({{"train_s": trained - start}}), flush=True)
tokens = 0
for batch in lines(encode_chars):
    tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
print(json.dumps({{"encode_s": time.perf_counter() - trained, "tokens": tokens,
                  "encoded": sum(len(line.encode()) for b in lines(encode_chars) for line in b)}}), flush=True)
'''


def run_plain(corpus: Path, kind: str, train_chars: int) -> dict:
    """Plain tokenizers in a fresh process: training's time and peak RSS, then encode_batch's MB/s."""
    script = PLAIN.format(repo=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script, kind, str(corpus), str(train_chars), str(ENCODE_CHARS)],
                            stdout=subprocess.PIPE, text=True)
    ps, train_rss, peak, lines = psutil.Process(proc.pid), 0, 0, []
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while proc.poll() is None or sel.select(0):
        try:
            rss = ps.memory_full_info().pss
            peak = max(peak, rss)
            if not lines:
                train_rss = max(train_rss, rss)
        except psutil.Error:
            pass
        if sel.select(0.05):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(json.loads(line))
    proc.wait()
    out = {k: v for d in lines for k, v in d.items()}
    out.update(train_rss=train_rss, peak=peak, seconds=time.perf_counter() - start,
               encode_mbs=out["encoded"] / 1e6 / out["encode_s"])
    return out


def train_tokens_per_second(overrides: list[str], seconds: int, workdir: Path) -> float:
    run = workdir / f"run-{len(list(workdir.iterdir()))}"
    cmd = [str(Path(sys.executable).parent / "llmcli"), "train", "--out", str(run), "-c",
           str(REPO / "configs/shakespeare-bpe.yaml"), *overrides, f"train.max_minutes={seconds / 60}",
           "train.log_interval=10"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
    rates = rates[2:] or rates  # past the first steps
    shutil.rmtree(run, ignore_errors=True)
    return statistics.median(rates)


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,500,2000", help="corpus sizes in MB")
    parser.add_argument("--kinds", default="char,word,bpe")
    parser.add_argument("--rounds", type=int, default=3, help="rounds for corpora under 100 MB")
    parser.add_argument("--big-rounds", type=int, default=1, help="rounds for corpora of 100 MB and more")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bench-data"))
    parser.add_argument("--train-seconds", type=int, default=60, help="0 skips the training comparison")
    args = parser.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, peaks = [], {}
    try:
        for size in sizes:
            corpus = root / f"shakespeare-{size}MB.txt"
            make_corpus(corpus, size)
            for kind in args.kinds.split(","):
                ours, plain = [], []
                for _ in range(args.rounds if size < 100 else args.big_rounds):
                    ours.append(run_ours(corpus, kind, root / "cache"))
                    plain.append(run_plain(corpus, kind, ours[-1]["train_chars"]))
                peaks[(size, kind)] = statistics.median(o["peak"] for o in ours)

                def s(runs, key, scale=1.0):
                    return Spread.of([r[key] * scale for r in runs])

                rows.append([f"{size} MB", kind, s(ours, "seconds"), gb(peaks[(size, kind)]),
                             s(ours, "train_s"), s(plain, "train_s"), ratios([o["train_s"] for o in ours],
                                                                            [p["train_s"] for p in plain]),
                             (f"{gb(statistics.median(o['train_rss'] for o in ours))} / "
                             f"{gb(statistics.median(p['train_rss'] for p in plain))}"),
                             s(ours, "encode_mbs"), s(plain, "encode_mbs"),
                             ratios([o["encode_mbs"] for o in ours], [p["encode_mbs"] for p in plain])])
            if size != sizes[-1]:
                corpus.unlink()
        table(f"llmcli data prepare vs plain tokenizers, one .txt of Shakespeare passages, {args.rounds} round(s) "
              f"under 100 MB, {args.big_rounds} above (median (min-max)); memory: peak PSS summed over processes",
              ["corpus", "tokenizer", "prepare s", "peak memory", "train s", "plain train s", "train x",
               "train memory ours / plain", "encode MB/s", "plain encode_batch MB/s", "encode x"], rows)
        for kind in args.kinds.split(","):
            worst = max(peaks[(s, kind)] for s in sizes)
            spread = worst / min(peaks[(s, kind)] for s in sizes) - 1
            print(f"{kind}: peak memory max {gb(worst)} (target <= 1 GiB), {100 * spread:.0f}% apart across sizes "
                  "(target <= 20%)")
        print("targets: train x <= 1.2 (memory <= 1.2x plain + 200 MB); encode x >= 0.9")
        if args.train_seconds and "bpe" in args.kinds:
            big = root / f"shakespeare-{sizes[-1]}MB.txt"
            work = root / "runs"
            work.mkdir(exist_ok=True)
            cache = f"data.cache_dir={root / 'cache'}"
            ref, big_rate = [], []
            for source in (f"data.source={big}", "data.source=shakespeare"):  # both caches ready before timing
                subprocess.run([str(Path(sys.executable).parent / "llmcli"), "data", "prepare", source, cache,
                                "tokenizer.kind=bpe", "tokenizer.vocab_size=8000"], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(args.big_rounds):
                ref.append(train_tokens_per_second([cache, "tokenizer.vocab_size=8000"], args.train_seconds, work))
                big_rate.append(train_tokens_per_second([cache, f"data.source={big}", "tokenizer.vocab_size=8000"],
                                                        args.train_seconds, work))
            table(f"llmcli train, configs/shakespeare-bpe.yaml with an 8k BPE, {args.train_seconds}s per run",
                  ["data", "tokens/s", "vs 5 MB cache"],
                  [["Shakespeare, 5 MB cache", Spread.of(ref), 1.0],
                   [f"{sizes[-1]} MB corpus, shards", Spread.of(big_rate), ratios(big_rate, ref)]])
            print("target: tokens/s equal (within noise) to training on the 5 MB cache")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
