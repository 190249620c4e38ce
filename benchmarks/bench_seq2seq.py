"""Sequence-to-sequence: training and decoding speed of the encoder-decoder, beam cost, G2P quality.

    python benchmarks/bench_seq2seq.py --parts train decode beams   # the speed tables (about 8 minutes on 2 cores)
    python benchmarks/bench_seq2seq.py --parts quality              # two G2P trainings (20 + 5 minutes) and their evals
    python benchmarks/bench_seq2seq.py --parts quality --reuse      # only score runs/g2p-{transformer,gru}

1. Training tok/s (target tokens, end tokens included) of `llmcli train` on the G2P Transformer
   recipe (configs/g2p-transformer.yaml) against a plain PyTorch loop of the same shapes on the
   same padded batches: nn.Transformer (post-norm, ReLU) with scaled embeddings and sinusoidal
   positions, a tied head, torch.optim.Adam, label-smoothed cross-entropy, gradient clipping and
   `loss.item()` every step.
2. Greedy decoding tok/s at batch 1 and 8 (val sources, fixed length: the end token ignored): our
   engine against `transformers`' MarianMTModel.generate() on the same weights (`llmcli export`).
3. Beam search cost per beam: the first 128 val words decoded with 1, 2, 4 and 8 beams (16 words
   at a time): words/s, decoder tokens/s over all beams, time against greedy, and exact match.
4. G2P quality: the Transformer recipe from scratch for 20 minutes and the GRU recipe for 5 (the
   issue's budget is the Transformer's), then `llmcli eval --split test`, greedy and --beams 4.

Parts 1-3 use the trained Transformer run (runs/g2p-transformer/best) when it exists, else a random
model of the recipe's shape. Comparisons run in interleaved rounds: median (min-max) over them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
from bench_recurrent import train_cli
from bench_train import _quiet
from common import Spread, console, ratios, table

from llmcli.config_loader import load_config
from llmcli.data.prepare_pairs import prepare_pairs

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"Transformer": (REPO / "configs/g2p-transformer.yaml", 20), "GRU": (REPO / "configs/g2p-gru.yaml", 5)}
RUNS = {"Transformer": REPO / "runs/g2p-transformer", "GRU": REPO / "runs/g2p-gru"}
PARTS = ("train", "decode", "beams", "quality")


def recipe():
    """The Transformer recipe with its vocabularies filled in, and its prepared pairs."""
    cfg = load_config(RECIPES["Transformer"][0])
    prepared = prepare_pairs(cfg, console=_quiet())
    model = dataclasses.replace(cfg.model, vocab_size=prepared.vocab_size, src_vocab_size=prepared.source_vocab_size)
    return dataclasses.replace(cfg, model=model), prepared


def trained_or_random(cfg):
    """(model, where it came from): the trained recipe run, or a random model of its shape."""
    from llmcli.checkpoint import load_model
    from llmcli.models.registry import build_model

    best = RUNS["Transformer"] / "best"
    if (best / "model.safetensors").is_file():
        return load_model(best).eval(), str(best)
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), "random init"


# --------------------------------------------------------------------------------------------
# 1. Training throughput


class PlainSeq2Seq(nn.Module):
    """What a newcomer writes from the PyTorch docs: nn.Transformer between embeddings and a head."""

    def __init__(self, m):
        super().__init__()
        self.scale = math.sqrt(m.d_model)
        self.src_embed, self.tgt_embed = nn.Embedding(m.source_vocab_size, m.d_model), nn.Embedding(m.vocab_size, m.d_model)
        self.transformer = nn.Transformer(m.d_model, m.n_head, m.encoder_layers, m.n_layer, m.ff_dim, m.dropout,
                                          batch_first=True)
        self.head = nn.Linear(m.d_model, m.vocab_size)
        self.head.weight = self.tgt_embed.weight
        from llmcli.models.encoder_decoder import sinusoids

        self.register_buffer("positions", sinusoids(max(m.block_size, m.source_context), m.d_model, "cpu"))

    def forward(self, idx, source, source_lengths):
        pad = torch.arange(source.shape[1])[None] >= source_lengths[:, None]
        src = self.src_embed(source) * self.scale + self.positions[:source.shape[1]]
        tgt = self.tgt_embed(idx) * self.scale + self.positions[:idx.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        out = self.transformer(src, tgt, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad,
                               tgt_is_causal=True)
        return self.head(out)


def plain_loop(cfg, batches, seconds: float) -> float:
    """Target tokens/s of the plain loop over llmcli's own batches (the same shapes, in the same order)."""
    from llmcli.train.batches import IGNORE

    torch.manual_seed(0)
    model = PlainSeq2Seq(cfg.model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    step, tokens, start = 0, 0, None
    while True:
        if step == 3:
            start, tokens = time.perf_counter(), 0
        inputs, labels = batches.batch(step, 0)
        logits = model(**inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=cfg.train.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        loss.item()
        tokens += int((labels != IGNORE).sum())
        step += 1
        if start is not None and time.perf_counter() - start > seconds:
            return tokens / (time.perf_counter() - start)


def llmcli_train(workdir: Path, steps: int) -> float:
    """Steady-state target tok/s of `llmcli train` on the recipe (median of its logged intervals)."""
    from llmcli.train.loop import train
    from llmcli.train.run_dir import RunPlan

    run = workdir / f"run{len(list(workdir.iterdir()))}"
    cfg = load_config(RECIPES["Transformer"][0], [f"train.max_steps={steps}", "train.max_minutes=null",
                                                  "train.log_interval=10", f"train.eval_interval={steps}",
                                                  "train.eval_batches=1"])
    train(RunPlan(cfg, run), console=_quiet())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = sorted(r["tokens_per_second"] for r in rows if "tokens_per_second" in r and r.get("step", 0) > 10)
    return steady[len(steady) // 2]


def training(rounds: int) -> None:
    from llmcli.train.batches import training_data
    from llmcli.train.loop import _resolve

    cfg, prepared = recipe()
    batches = training_data(prepared, _resolve(cfg, prepared), 1).train
    plain, ours = [], []
    with tempfile.TemporaryDirectory(prefix="bench-seq2seq-") as tmp:
        for _ in range(rounds):
            plain.append(plain_loop(cfg, batches, seconds=15))
            ours.append(llmcli_train(Path(tmp), 100))
    m = cfg.model
    shape = f"{m.encoder_layers}+{m.n_layer} x {m.d_model}, ff {m.ff_dim}, batch {cfg.train.batch_size}"
    table(f"Encoder-decoder training, fp32, 1 process, target tokens/s; median (min-max) of {rounds} interleaved "
          "rounds (target llmcli / plain >= 1.0)", ["recipe shape", "path", "tok/s", "vs plain"],
          [[shape, "plain loop (nn.Transformer + Adam)", Spread.of(plain), ratios(plain, plain)],
           [shape, "llmcli train", Spread.of(ours), ratios(ours, plain)]])


# --------------------------------------------------------------------------------------------
# 2. Greedy decoding against transformers


@torch.inference_mode()
def ours_decode(model, sources: list[list[int]], new: int, eot: int) -> float:
    from llmcli.generate.engine import Engine
    from llmcli.options.sampling import SamplingParams

    engine = Engine(model, max_batch_size=len(sources))
    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eot=True)
    start = time.perf_counter()
    for source in sources:
        engine.add([eot], params, source_ids=source)
    generated = 0
    while engine.has_work():
        generated += len(engine.step())
    return generated / (time.perf_counter() - start)


@torch.inference_mode()
def hf_decode(transformers, hf, sources: list[list[int]], new: int, eot: int) -> float:
    ids = torch.full((len(sources), max(map(len, sources))), eot)
    for i, s in enumerate(sources):
        ids[i, :len(s)] = torch.tensor(s)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(s) for s in sources])[:, None]).long()
    config = transformers.GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new, min_new_tokens=new,
                                           eos_token_id=None, pad_token_id=eot, decoder_start_token_id=eot)
    start = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return (out.shape[1] - 1) * len(sources) / (time.perf_counter() - start)


def decoding(rounds: int) -> None:
    import transformers

    from llmcli.checkpoint import write_checkpoint
    from llmcli.evaluate_pairs import first_sources
    from llmcli.hf.export import export_hf
    from llmcli.options.checkpoints import ExportOptions

    cfg, prepared = recipe()
    model, origin = trained_or_random(cfg)
    sources, new, eot = first_sources(prepared, "val", 8), cfg.model.block_size - 1, prepared.eot_id
    with tempfile.TemporaryDirectory(prefix="bench-seq2seq-") as tmp:
        run = RUNS["Transformer"] / "best"
        if origin == "random init":  # a checkpoint of it, to export
            run = Path(tmp) / "run"
            files = {"source_tokenizer.json": prepared.source_tokenizer_path.read_bytes()}
            write_checkpoint(run, model, cfg, prepared.tokenizer_path.read_bytes(), {"step": 0}, files)
        export_hf(ExportOptions(run_dir=run, out=Path(tmp) / "hf"))
        hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(Path(tmp) / "hf").eval()
    ours_decode(model, sources, 4, eot), hf_decode(transformers, hf, sources, 4, eot)  # warm-up
    measured: dict[str, list[float]] = {"hf1": [], "ours1": [], "hf8": [], "ours8": []}
    for _ in range(rounds):
        measured["hf1"].append(hf_decode(transformers, hf, sources[:1], new, eot))
        measured["ours1"].append(ours_decode(model, sources[:1], new, eot))
        measured["hf8"].append(hf_decode(transformers, hf, sources, new, eot))
        measured["ours8"].append(ours_decode(model, sources, new, eot))
    table(f"Encoder-decoder greedy decoding, fp32, {new} new tokens per val source ({origin}); median (min-max) of "
          f"{rounds} interleaved rounds", ["batch", "transformers generate() tok/s", "llmcli engine tok/s", "ours / hf"],
          [[b, Spread.of(measured[f"hf{b}"]), Spread.of(measured[f"ours{b}"]),
            ratios(measured[f"ours{b}"], measured[f"hf{b}"])] for b in (1, 8)])


# --------------------------------------------------------------------------------------------
# 3. Beam search cost


def beams(rounds: int, words: int = 128) -> None:
    from llmcli.evaluate_pairs import _sources_in_order
    from llmcli.generate.beam import BeamSearch, BeamSettings
    from llmcli.tokenizer import decode, load_tokenizer

    cfg, prepared = recipe()
    model, origin = trained_or_random(cfg)
    texts = prepared.texts("val")
    order = _sources_in_order(texts, words)
    arrays = prepared.arrays("val")
    sources = [arrays.source_ids(pairs[0]).tolist() for pairs in order.values()]
    references = [{texts[i][1] for i in pairs} for pairs in order.values()]
    tokenizer, eot = load_tokenizer(prepared.tokenizer_path), prepared.eot_id
    widths = (1, 2, 4, 8)
    seconds: dict[int, list[float]] = {b: [] for b in widths}
    decoder_tokens, exact = {}, {}
    for _ in range(rounds):
        for b in widths:
            search = BeamSearch(model, batch_size=16, beams=b, eos_id=eot)
            start = time.perf_counter()
            found = search.run([[eot]] * len(sources), BeamSettings(b, cfg.model.block_size - 1), sources)
            seconds[b].append(time.perf_counter() - start)
            decoder_tokens[b] = search.tokens
            outputs = [decode(tokenizer, h[0].tokens, skip_special_tokens=True).strip() for h in found]
            exact[b] = sum(o in refs for o, refs in zip(outputs, references, strict=True)) / len(sources)
    table(f"Beam search cost, {len(sources)} val words, 16 at a time, fp32 ({origin}); median (min-max) of {rounds} "
          "interleaved rounds", ["beams", "words/s", "decoder tok/s (all beams)", "time vs 1 beam", "exact match"],
          [[b, Spread.of([len(sources) / s for s in seconds[b]]), Spread.of([decoder_tokens[b] / s for s in seconds[b]]),
            ratios(seconds[b], seconds[1]), exact[b]] for b in widths])


# --------------------------------------------------------------------------------------------
# 4. G2P quality


def quality(reuse: bool) -> None:
    rows = []
    for name, (config, minutes) in RECIPES.items():
        run = RUNS[name]
        if not (reuse and (run / "best" / "model.safetensors").is_file()):
            train_cli(config, run, minutes * 60)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in metrics if "elapsed" in r][-1]
        scores = {b: score(run / "best", b) for b in (1, 4)}
        rows.append([name, f"{last['step']} / {last['elapsed']:.0f}", f"{last.get('epoch', 0):.2f}",
                     *[f"{100 * scores[b][k]:.1f}%" for b in (1, 4) for k in ("wer", "per")]])
    table("G2P on CMUdict (39 phonemes, no stress), from scratch, 2 CPU cores; test split "
          "(target Transformer, 20 min: WER <= 30%, PER <= 7%)",
          ["recipe", "steps / s", "epochs", "WER greedy", "PER greedy", "WER 4 beams", "PER 4 beams"], rows)


def score(checkpoint: Path, beams: int) -> dict:
    command = [sys.executable, "-m", "llmcli", "eval", str(checkpoint), "--split", "test", "--beams", str(beams),
               "--json"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds of each comparison")
    parser.add_argument("--reuse", action="store_true", help="quality: score existing runs instead of training")
    args = parser.parse_args()
    os.environ.setdefault("LLMCLI_CACHE_DIR", str(REPO / ".bench-cache"))
    started = time.perf_counter()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    parts = {"train": lambda: training(args.rounds), "decode": lambda: decoding(args.rounds),
             "beams": lambda: beams(args.rounds), "quality": lambda: quality(args.reuse)}
    for name in args.parts:
        parts[name]()
    console.print(f"total {time.perf_counter() - started:.0f}s; ratios are measured in this run, absolute "
                  f"numbers vary by machine (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
