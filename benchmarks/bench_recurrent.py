"""Recurrent models: training throughput, decoding, learning efficiency next to the Transformer, int8.

    python benchmarks/bench_recurrent.py                          # every table (about 25 minutes on 2 cores)
    python benchmarks/bench_recurrent.py --parts throughput decode # no 300 s trainings (about 5 minutes)

1. Training tok/s of `llmcli train` on the LSTM and GRU recipes (configs/shakespeare-{lstm,gru}.yaml)
   against the loop of PyTorch's word-language-model example on the same shape: contiguous
   streams, hidden state carried and detached, nn.LSTM/nn.GRU + torch.optim.Adam (its default
   implementation), gradient clipping and `loss.item()` every step. One more plain row swaps in
   fused Adam, to show what the optimizer alone adds; one llmcli row adds train.compile.
2. Decoding, greedy, fp32: llmcli's engine at batch 1 and 8 against a plain `for` loop that calls
   the recurrent layer (nn.LSTM/nn.GRU, as a newcomer writes it) on one token at a time.
3. Learning efficiency: the Transformer, LSTM and GRU recipes, each from scratch for 300 s by
   `llmcli train` (its output goes to runs/bench-<name>.train.log), then the full held-out val
   and test plays scored by `llmcli eval` (a recurrent model carries its state through the whole
   split). The Transformer run is bench_train.py's (runs/bench-learning) when `make bench` has
   just made it.
4. int8 and int4 of the trained LSTM recipe vs float32: size, val perplexity, batch-1 decode
   (bench_quantize.py's measurement, on `llmcli quantize`'s code path).

Every comparison runs in interleaved rounds and shows median (min-max) over them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import ours as engine_decode
from bench_quantize import VARIANTS, measure, print_table
from bench_train import LEARNING_RUN, _quiet, llmcli_tokens_per_second
from common import Spread, console, ratios, table

from llmcli.config_loader import load_config
from llmcli.data.prepare import prepare_data
from llmcli.models.registry import build_model
from llmcli.options.inference import EvalOptions

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"LSTM": REPO / "configs/shakespeare-lstm.yaml", "GRU": REPO / "configs/shakespeare-gru.yaml"}
TRANSFORMER = REPO / "configs/shakespeare-char.yaml"
RUNS = {"Transformer": REPO / "runs/bench-transformer", "LSTM": REPO / "runs/bench-lstm",
        "GRU": REPO / "runs/bench-gru"}
PARTS = ("throughput", "decode", "learning", "quantize")


def recipe(path: Path):
    """The config with its vocabulary filled in from the prepared data, and the training tokens."""
    cfg = load_config(path)
    prepared = prepare_data(cfg, console=_quiet())
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=prepared.vocab_size))
    return cfg, prepared.tokens("train")


# --------------------------------------------------------------------------------------------
# 1. Training throughput


class ExampleModel(nn.Module):
    """The word-language-model example's RNNModel: encoder, dropout, recurrent layers, decoder."""

    def __init__(self, kind: str, m):
        super().__init__()
        hidden = m.d_hidden or m.d_model
        self.encoder = nn.Embedding(m.vocab_size, m.d_model)
        self.rnn = getattr(nn, kind)(m.d_model, hidden, m.n_layer, dropout=m.dropout if m.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(m.dropout)
        self.decoder = nn.Linear(hidden, m.vocab_size)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden


def example_loop(kind: str, cfg, tokens, seconds: float, fused: bool = False) -> float:
    """Tokens/s of the example's training loop (batchify, bptt windows, repackage_hidden)."""
    torch.manual_seed(0)
    m, t = cfg.model, cfg.train
    model = ExampleModel(kind, m)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, fused=True if fused else None)
    stream = torch.from_numpy(tokens[: len(tokens) // t.batch_size * t.batch_size].astype("int64"))
    data = stream.view(t.batch_size, -1).t().contiguous()  # [steps, batch]: batch contiguous streams
    hidden, step, start, i = None, 0, None, 0
    while True:
        if step == 3:
            start = time.perf_counter()
        if i + m.block_size + 1 > len(data):
            i, hidden = 0, None
        x, y = data[i:i + m.block_size], data[i + 1:i + 1 + m.block_size]
        i += m.block_size
        if hidden is not None:  # repackage_hidden: keep the values, cut the graph
            hidden = tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()
        model.zero_grad()
        output, hidden = model(x, hidden)
        loss = F.cross_entropy(output.view(-1, m.vocab_size), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        loss.item()
        step += 1
        if start is not None and time.perf_counter() - start > seconds:
            return (step - 3) * t.batch_size * m.block_size / (time.perf_counter() - start)


def throughput(workdir: Path, rounds: int) -> None:
    """The example loop (for-loop and fused Adam), `llmcli train` eager and compiled, in turns."""
    rows = []
    for kind, path in RECIPES.items():
        cfg, tokens = recipe(path)
        llmcli_tokens_per_second(["train.compile=true"], 20, workdir, config=path)  # compile once, cached after
        measured: dict[str, list[float]] = {"plain": [], "fused": [], "eager": [], "compiled": []}
        warm = []
        for _ in range(rounds):
            measured["plain"].append(example_loop(kind, cfg, tokens, seconds=5))
            measured["fused"].append(example_loop(kind, cfg, tokens, seconds=5, fused=True))
            measured["eager"].append(llmcli_tokens_per_second(["train.compile=false"], 60, workdir, config=path)[0])
            tok_s, seconds = llmcli_tokens_per_second(["train.compile=true"], 60, workdir, config=path)
            measured["compiled"].append(tok_s)
            warm.append(seconds)
        shape = f"{kind} {cfg.model.n_layer}x{cfg.model.hidden_size}, block {cfg.model.block_size}, " \
                f"batch {cfg.train.batch_size}"
        for label, key, extra in [("example loop (nn + Adam)", "plain", "-"),
                                  ("example loop, fused Adam", "fused", "-"),
                                  ("llmcli train (eager)", "eager", "-"),
                                  ("llmcli train (compile)", "compiled", f"{min(warm):.0f}s")]:
            rows.append([shape, label, Spread.of(measured[key]), ratios(measured[key], measured["plain"]), extra])
    table(f"Recurrent training throughput (fp32, 1 process; median (min-max) of {rounds} interleaved rounds; "
          "target llmcli / example loop >= 1.0)",
          ["recipe shape", "path", "tok/s", "vs example", "warm-up (compile cached)"], rows)


# --------------------------------------------------------------------------------------------
# 2. Decoding


@torch.inference_mode()
def plain_decode(model, prompts: list[list[int]], new: int) -> float:
    """A `for` loop over tokens, each through nn.LSTM/nn.GRU as it comes (batch = len(prompts))."""
    start = time.perf_counter()
    out, hidden = model.rnn(model.tok_embed(torch.tensor(prompts)))
    token = model.lm_head(out[:, -1]).argmax(-1)
    for _ in range(new - 1):
        out, hidden = model.rnn(model.tok_embed(token[:, None]), hidden)
        token = model.lm_head(out[:, -1]).argmax(-1)
    return new * len(prompts) / (time.perf_counter() - start)


def decode_round(model, prompts: list[list[int]], new: int) -> list[float]:
    """tok/s of: plain b1, ours b1, plain b8, ours b8."""
    return [plain_decode(model, prompts[:1], new), engine_decode(model, prompts[:1], new),
            plain_decode(model, prompts, new), engine_decode(model, prompts, new)]


def decoding(new: int, rounds: int) -> None:
    """Plain b1, ours b1, plain b8, ours b8, taking turns so that a slow spell hits them alike."""
    rows = []
    for kind, path in RECIPES.items():
        cfg, _ = recipe(path)
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        prompts = torch.randint(0, cfg.model.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1)).tolist()
        decode_round(model, prompts, 4)  # warm-up
        plain_1, ours_1, plain_8, ours_8 = (list(c) for c in zip(*[decode_round(model, prompts, new)
                                                                   for _ in range(rounds)], strict=True))
        rows.append([f"{kind} {cfg.model.n_layer}x{cfg.model.hidden_size}", Spread.of(plain_1), Spread.of(ours_1),
                     ratios(ours_1, plain_1), Spread.of(plain_8), Spread.of(ours_8), ratios(ours_8, ours_1)])
    table(f"Recurrent decoding, fp32, greedy, 16-token prompts + {new} new tokens; median (min-max) of {rounds} "
          "interleaved rounds (target ours b8/b1 >= 5)",
          ["model", "plain loop b1 tok/s", "ours b1 tok/s", "ours/plain b1", "plain loop b8 tok/s",
           "ours b8 tok/s", "ours b8/b1"], rows)


# --------------------------------------------------------------------------------------------
# 3. Learning efficiency


def learning(seconds: int) -> None:
    from llmcli.evaluate import evaluate_checkpoint

    rows = []
    for name, path in {"Transformer": TRANSFORMER, **RECIPES}.items():
        run = RUNS[name]
        if name == "Transformer" and (LEARNING_RUN / "best" / "model.safetensors").is_file():
            run = LEARNING_RUN  # bench_train.py's 300 s run, made just before in `make bench`
        else:
            train_cli(path, run, seconds)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in metrics if "elapsed" in r][-1]
        bits = {split: evaluate_checkpoint(run / "best", EvalOptions(targets=[str(run / "best")], split=split,
                                                                      batch_size=64), progress=False)
                for split in ("val", "test")}
        cfg = load_config(run / "config.yaml")
        rows.append([name, _shape(cfg.model), f"{last['step']} / {last['elapsed']:.0f}",
                     last["tokens_seen"] / last["elapsed"], f"{last['epoch']:.2f}",
                     bits["val"].metrics["bits_per_byte"], bits["test"].metrics["bits_per_byte"]])
    best = min(r[5] for r in rows if r[0] != "Transformer")
    table(f"Learning efficiency: each recipe from scratch, {seconds} s budget; full held-out plays "
          f"(target: best recurrent val <= 2.40 bits/char; measured {best:.2f})",
          ["recipe", "shape", "steps / s", "tok/s", "epochs", "val bits/char", "test bits/char"], rows)


def train_cli(config: Path, run: Path, seconds: int) -> None:
    """`llmcli train -c CONFIG --out RUN --overwrite train.max_minutes=...`, its output kept in a log."""
    log = run.parent / f"{run.name}.train.log"
    run.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "llmcli", "train", "-c", str(config), "--out", str(run), "--overwrite",
               "--threads", str(torch.get_num_threads()), f"train.max_minutes={seconds / 60:g}", "train.max_steps=null"]
    with log.open("w") as fh:
        fh.write("$ llmcli " + " ".join(command[3:]) + "\n")
        fh.flush()
        subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=True, env={**os.environ, "COLUMNS": "100"})


def _shape(m) -> str:
    if m.arch == "transformer":
        return f"{m.n_layer}x{m.d_model}, {m.n_head} heads, block {m.block_size}"
    return f"{m.arch} {m.n_layer}x{m.hidden_size}, emb {m.d_model}, window {m.block_size}"


# --------------------------------------------------------------------------------------------
# 4. Quantization


def quantization(args: argparse.Namespace) -> None:
    run = RUNS["LSTM"] / "best"
    if not (run / "model.safetensors").is_file():
        console.print(f"no trained LSTM in {run} (run the learning part first): quantization skipped")
        return
    with tempfile.TemporaryDirectory(prefix="bench-recurrent-") as tmp:
        rows = measure("shakespeare lstm", run, VARIANTS, args, Path(tmp), ppl=True)
    print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--learning-seconds", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds of each comparison")
    parser.add_argument("--new", type=int, default=128, help="tokens to decode per sequence")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("LLMCLI_CACHE_DIR", str(REPO / ".bench-cache"))
    started = time.perf_counter()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if "throughput" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            throughput(Path(tmp), args.rounds)
    if "decode" in args.parts:
        decoding(args.new, args.rounds)
    if "learning" in args.parts:
        learning(args.learning_seconds)
    if "quantize" in args.parts:
        quantization(args)
    console.print(f"total {time.perf_counter() - started:.0f}s; ratios are measured in this run, absolute "
                  f"numbers vary by machine (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
