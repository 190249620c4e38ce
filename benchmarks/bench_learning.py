"""Learning efficiency: what each family's shipped recipe learns in a fixed wall-clock budget, against
the public recipes it is measured by, run in the same invocation on the same text.

* char: nanoGPT's README CPU recipe (4 x 128, block 64, batch 12, 2,000 iterations) on tiny
  Shakespeare, then `configs/shakespeare-char.yaml` for `--char-seconds` on the same text (its val:
  the last 10% of the characters, as nanoGPT's). Reported: nanoGPT's final val loss and time, when
  llmcli's run first evaluates at or below that loss (the ratio of the times; it evaluates every 25
  steps on 5 batches of 48 x 64 tokens, as many as nanoGPT's 20 of 12 x 64), and llmcli's val loss
  at the end of its budget (in-run evaluation, and `llmcli eval` of best/ on the whole val split).
* word: pytorch/examples' word_language_model with its defaults (LSTM 2 x 200, dropout 0.2, SGD lr
  20, bptt 35) and `configs/word-lstm.yaml`, each for `--word-seconds`, on tiny Shakespeare's lines
  split 80/10/10 in order. Compared in bits per byte of valid.txt (the tokenizations differ): the
  example's best epoch's valid loss x its tokens / the file's bytes; llmcli eval --text-file.
* g2p: `configs/g2p-transformer.yaml` for `--g2p-minutes` and `llmcli eval --split test`, against
  published CMU-dictionary results (quoted, with their sources: they trained for hours on GPUs).

The anchors' code is not part of llmcli: give local checkouts of github.com/karpathy/nanoGPT
(`--nanogpt`) and github.com/pytorch/examples (`--examples`), and tiny Shakespeare's input.txt
(`--text`, from github.com/karpathy/char-rnn data/tinyshakespeare). Each anchor runs from a
temporary copy, with its own defaults; nothing is downloaded. Under the shared lock:

    python benchmarks/bench_learning.py --text input.txt --nanogpt ../nanoGPT --examples ../examples
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import console, table

ROOT = Path(__file__).resolve().parent.parent
NANOGPT_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                  "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                  "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
# Published G2P results on the CMU dictionary (stress removed), test WER / PER in %, as issue 31
# quotes them (rounded), with the papers they come from.
PUBLISHED_G2P = [
    (("Transformer (Yolchuyeva, Nemeth & Gyires-Toth, 'Transformer based grapheme-to-phoneme conversion', "
      "Interspeech 2019)"), 22.0, 5.2),
    (("bi-LSTM (Yao & Zweig, 'Sequence-to-sequence neural net models for grapheme-to-phoneme conversion', "
      "Interspeech 2015)"), 23.6, 5.5),
    ("Phonetisaurus (Novak, Minematsu & Hirose: WFST joint-sequence models)", 24.4, 5.9),
]


def llmcli(*args: str, log: Path) -> str:
    """Run `python -m llmcli ARGS` (2 threads), its output appended to `log`; stdout back."""
    command = [sys.executable, "-m", "llmcli", *args]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    with log.open("a") as fh:
        fh.write("$ llmcli " + " ".join(args) + "\n" + result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"llmcli {args[0]} failed (see {log})")
    return result.stdout


def timed_lines(command: list[str], cwd: Path, log: Path, seconds: float | None = None) -> list[tuple[float, str]]:
    """Run `command`, stamping each output line with the seconds since it started; stop it after
    `seconds` (None: let it finish)."""
    started = time.perf_counter()
    lines = []
    with log.open("w") as fh, subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"}) as p:
        os.set_blocking(p.stdout.fileno(), False)
        while True:
            line = p.stdout.readline()
            if line:
                lines.append((time.perf_counter() - started, line.rstrip()))
                fh.write(f"{lines[-1][0]:9.2f} {line}")
                continue
            if p.poll() is not None:
                break
            if seconds is not None and time.perf_counter() - started > seconds:
                p.terminate()
                p.wait()
                break
            time.sleep(0.05)
    return lines


def first_crossing(run: Path, target: float) -> tuple[float | None, int | None]:
    """Training seconds and step of the first evaluation of `run` at or below `target`."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed"] for r in rows if "elapsed" in r}
    for r in rows:
        if "val_loss" in r and r["val_loss"] <= target:
            return elapsed[r["step"]], r["step"]
    return None, None


def eval_json(run: Path, log: Path, *args: str) -> dict:
    return json.loads(llmcli("eval", str(run), "--json", "--threads", "2", *args, log=log).strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# char: nanoGPT's CPU recipe against configs/shakespeare-char.yaml


def char(args: argparse.Namespace, work: Path, rows: list[list[object]]) -> None:
    nano = work / "nanoGPT"
    shutil.copytree(args.nanogpt, nano, ignore=shutil.ignore_patterns(".git"), dirs_exist_ok=True)
    shutil.copy(args.text, nano / "data/shakespeare_char/input.txt")
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=nano, check=True, capture_output=True)
    lines = timed_lines([sys.executable, "train.py", *NANOGPT_RECIPE, f"--out_dir={work / 'nano-out'}"], nano,
                        work / "nanogpt.log")
    start = next(t for t, line in lines if line.startswith("iter 0:"))
    evals = [(t - start, float(m.group(2))) for t, line in lines
             if (m := re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line))]
    nano_seconds, nano_val = evals[-1]
    console.print(f"nanoGPT: val {nano_val:.4f} after {nano_seconds:.1f} s (2,000 iterations)")

    run, log = work / "char", work / "char.log"
    llmcli("train", "-c", "shakespeare-char", "--out", str(run), "--threads", "2", f"data.source={args.text}",
           "data.val_fraction=0.1", f"train.max_minutes={args.char_seconds / 60:g}", "train.eval_interval=25",
           "train.eval_batches=5", log=log)
    seconds, step = first_crossing(run, nano_val)
    rows_ = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows_ if "val_loss" in r][-1]
    full = eval_json(run / "best", log, "--split", "val")["loss"]
    crossing = f"{seconds:.1f} s (step {step}), {seconds / nano_seconds:.2f}x" if seconds else "not reached"
    rows.append(["char Transformer, tiny Shakespeare", f"nanoGPT CPU recipe: val {nano_val:.3f} in {nano_seconds:.0f} s",
                 f"reaches {nano_val:.3f} at {crossing}", "<= 0.4x"])
    rows.append(["", "", f"val at {args.char_seconds} s: {last['val_loss']:.3f} (in run), {full:.3f} (whole val split)",
                 "<= 1.50"])


# --------------------------------------------------------------------------------------------
# word: pytorch/examples' word_language_model against configs/word-lstm.yaml


def word(args: argparse.Namespace, work: Path, rows: list[list[object]]) -> None:
    data = work / "words"
    data.mkdir()
    lines = Path(args.text).read_text(encoding="utf-8").splitlines(keepends=True)
    cut1, cut2 = int(len(lines) * 0.8), int(len(lines) * 0.9)
    for name, part in (("train", lines[:cut1]), ("valid", lines[cut1:cut2]), ("test", lines[cut2:])):
        (data / f"{name}.txt").write_text("".join(part), encoding="utf-8")
    valid = data / "valid.txt"
    valid_bytes = valid.stat().st_size
    # the example's tokens: whitespace-split words and an <eos> per line (its data.py)
    valid_tokens = sum(len(line.split()) + 1 for line in valid.read_text(encoding="utf-8").splitlines())

    example = work / "word_language_model"
    shutil.copytree(Path(args.examples) / "word_language_model", example, ignore=shutil.ignore_patterns("data"))
    lines_out = timed_lines([sys.executable, "main.py", "--data", str(data), "--epochs", "100000",
                             "--save", str(work / "wlm.pt")], example, work / "word_language_model.log",
                            seconds=args.word_seconds)
    losses = [float(m.group(1)) for _, line in lines_out
              if (m := re.search(r"end of epoch\s+\d+ \|.*valid loss\s+([\d.]+)", line))]
    if not losses:
        raise SystemExit(f"word_language_model finished no epoch in {args.word_seconds} s")
    anchor_bpb = min(losses) * valid_tokens / valid_bytes / math.log(2)

    # llmcli reads the three files as a dataset with its own train / validation / test splits
    import datasets

    saved = work / "words-dataset"
    datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": [(data / f"{name}.txt").read_text()]})
                          for split, name in (("train", "train"), ("validation", "valid"), ("test", "test"))}
                         ).save_to_disk(str(saved))
    run, log = work / "word", work / "word.log"
    llmcli("train", "-c", "word-lstm", "--out", str(run), "--threads", "2", f"data.source={saved}",
           f"train.max_minutes={args.word_seconds / 60:g}", log=log)
    ours = eval_json(run / "best", log, "--text-file", str(valid))["bits_per_byte"]
    anchor = f"word_language_model defaults, {len(losses)} epochs in {args.word_seconds} s: {anchor_bpb:.3f} bits/byte"
    ours_text = f"{ours:.3f} bits/byte in {args.word_seconds} s, {ours / anchor_bpb:.3f}x"
    rows.append(["word LSTM, tiny Shakespeare lines 80/10/10", anchor, ours_text, "<= 0.9x"])


# --------------------------------------------------------------------------------------------
# g2p: configs/g2p-transformer.yaml against published results


def g2p(args: argparse.Namespace, work: Path, rows: list[list[object]]) -> None:
    run, log = work / "g2p", work / "g2p.log"
    llmcli("train", "-c", "g2p-transformer", "--out", str(run), "--threads", "2",
           f"train.max_minutes={args.g2p_minutes:g}", log=log)
    scores = {beams: eval_json(run / "best", log, "--split", "test", "--beams", str(beams)) for beams in (1, 4)}
    published = "; ".join(f"{name.split(' (')[0]} {wer:.1f}% / {per:.2f}%" for name, wer, per in PUBLISHED_G2P)
    ours = ", ".join(f"{'greedy' if b == 1 else f'{b} beams'} {100 * s['wer']:.1f}% / {100 * s['per']:.2f}%"
                     for b, s in scores.items())
    rows.append(["G2P, CMU dictionary (test WER / PER)", f"published: {published}",
                 f"{args.g2p_minutes:g} min: {ours}", "<= 28% / <= 7%"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, required=True, help="tiny Shakespeare (char-rnn's input.txt)")
    parser.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT (the char part)")
    parser.add_argument("--examples", type=Path, help="a checkout of pytorch/examples (the word part)")
    parser.add_argument("--parts", nargs="+", choices=["char", "word", "g2p"], default=["char", "word", "g2p"])
    parser.add_argument("--char-seconds", type=int, default=300)
    parser.add_argument("--word-seconds", type=int, default=300)
    parser.add_argument("--g2p-minutes", type=float, default=20)
    parser.add_argument("--keep", type=Path, help="keep the runs and logs here (default: a temporary folder)")
    args = parser.parse_args()
    for part, flag in (("char", "nanogpt"), ("word", "examples")):
        if part in args.parts and getattr(args, flag) is None:
            parser.error(f"the {part} part needs --{flag} (a local checkout)")
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for part in args.parts:
            {"char": char, "word": word, "g2p": g2p}[part](args, work, rows)
        table("Learning efficiency: shipped recipes against public anchors, same machine, same wall clock",
              ["family", "anchor (measured here; G2P: published)", "llmcli", "target"], rows)
    if "g2p" in args.parts:
        console.print("published G2P sources: " + "; ".join(name for name, _, _ in PUBLISHED_G2P))


if __name__ == "__main__":
    main()
