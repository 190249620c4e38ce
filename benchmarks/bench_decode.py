"""Decode benchmark: llmcli's engine vs Hugging Face `generate()` and vs llama.cpp on the same weights,
and the memory roofline.

    python benchmarks/bench_decode.py                     # both tables (about 6 minutes)
    python benchmarks/bench_decode.py --table hf          # llmcli vs HF only (about 3 minutes)
    python benchmarks/bench_decode.py --table llama-cpp   # llmcli vs llama.cpp only (about 3 minutes)

Every side runs greedy decoding of NEW tokens after a PROMPT-token prompt on the same weights (ours
exported with `llmcli export --format hf` or `--format gguf`). tok/s counts generated tokens over the
whole call (prefill included), the same way for all. The roofline is what reading every weight once
per step allows: copy bandwidth / weight bytes (batch 1 decode is memory-bound on CPU).

The llama.cpp table (llama-cpp-python, the `.[gguf]` extra; skipped without it) runs batch 1 with 2
threads on both sides: llmcli float32 and int8 (`llmcli quantize --method int8 --include-embeddings`:
every matrix int8) against llama.cpp f32 and q8_0, the q8_0 file exported from that int8 checkpoint
(the same integers). llama.cpp keeps its own defaults otherwise (float16 KV cache). Shapes: the demo
model's (configs/shakespeare-char.yaml: Llama-style 4 x 128, 82-token char vocabulary; context 256
so that 16 + 64 tokens fit) and GPT-2 124M; random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Spread, console, copy_bandwidth_gbs, ratios, table

from llmcli.config import ModelConfig
from llmcli.config_loader import build_config
from llmcli.generate.engine import Engine
from llmcli.models.transformer import Transformer
from llmcli.options.checkpoints import ExportOptions
from llmcli.options.sampling import SamplingParams

SHAPES = {
    "4x128 (char vocab)": dict(n_layer=4, n_head=4, d_model=128, block_size=256, vocab_size=82),
    "GPT-2 124M": dict(n_layer=12, n_head=12, d_model=768, block_size=1024, vocab_size=50257),
}
LLAMA_CPP_SHAPES = {
    "demo 4x128 (Llama-style, char vocab)": dict(preset="llama", n_layer=4, n_head=4, d_model=128, block_size=256,
                                                 vocab_size=82),
    "GPT-2 124M": dict(preset="gpt2", n_layer=12, n_head=12, d_model=768, block_size=1024, vocab_size=50257),
}
THREADS = 2


def ours(model: Transformer, prompts: list[list[int]], new: int) -> float:
    engine = Engine(model, max_batch_size=len(prompts))
    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eot=True)
    start = time.perf_counter()
    for prompt in prompts:
        engine.add(prompt, params)
    generated = 0
    while engine.has_work():
        generated += len(engine.step())
    return generated / (time.perf_counter() - start)


def prefill_rate(model: Transformer, length: int) -> float:
    engine = Engine(model, max_batch_size=1)
    prompt = torch.randint(0, model.config.vocab_size, (length,)).tolist()
    start = time.perf_counter()
    engine.add(prompt, SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eot=True))
    while engine.has_work():
        engine.step()
    return length / (time.perf_counter() - start)


def hf(hf_model, prompts: list[list[int]], new: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=0)
    generated = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return generated / (time.perf_counter() - start)


def measure(model: Transformer, hf_model, args: argparse.Namespace) -> list[tuple[float, ...]]:
    """Per round, tok/s of: ours b1, ours b8, HF b1, HF b8, and our prefill rate.

    The five measurements take turns (all five, then all five again, ...) after a short warm-up
    round, so a slow spell on a shared machine hits ours and HF's alike.
    """
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (8, args.prompt), generator=gen).tolist()
    def runs(new: int, prefill: int) -> list[float]:
        return [ours(model, prompts[:1], new), ours(model, prompts, new), hf(hf_model, prompts[:1], new),
                hf(hf_model, prompts, new), prefill_rate(model, prefill)]

    runs(4, 16)  # warm-up: every code path once, briefly
    rounds = [runs(args.new, min(512, model.config.block_size)) for _ in range(args.repeat)]
    return list(zip(*rounds, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=64, help="tokens to generate per sequence")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--table", choices=("all", "hf", "llama-cpp"), default="all", help="which comparison")
    args = parser.parse_args()
    if args.table in ("all", "hf"):
        hf_table(args)
    if args.table in ("all", "llama-cpp"):
        llama_cpp_table(args)


def hf_table(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from llmcli.hf.export import export_hf

    bandwidth = copy_bandwidth_gbs()  # the best of this and one after each shape: see bench_train's Peak
    rows = []
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        cfg = build_config({"model": {"preset": "gpt2", **shape}}).model
        model = Transformer(cfg).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            _write_checkpoint(model, cfg, Path(tmp) / "ckpt")
            export_hf(ExportOptions(run_dir=Path(tmp) / "ckpt", out=Path(tmp) / "hf"))
            hf_model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        ours_1, ours_8, hf_1, hf_8, prefill = measure(model, hf_model, args)
        bandwidth = max(bandwidth, copy_bandwidth_gbs())
        rows.append([name, f"{weight_bytes / 2**20:.0f} MiB", Spread.of(ours_1), Spread.of(hf_1),
                     ratios(ours_1, hf_1), [t * weight_bytes / 1e9 for t in ours_1], Spread.of(ours_8),
                     ratios(ours_8, ours_1), Spread.of(hf_8), Spread.of(prefill)])
    for row in rows:  # GB/s read at batch 1 -> % of the roofline, against the best bandwidth seen
        row[5] = Spread.of([100 * gbs / bandwidth for gbs in row[5]])
    table(f"Decode, fp32, greedy, {args.prompt}-token prompt + {args.new} new tokens; median (min-max) of "
          f"{args.repeat} interleaved rounds (copy bandwidth {bandwidth:.1f} GB/s)",
          ["model", "weights", "ours b1 tok/s", "HF b1 tok/s", "ours/HF b1", "% of roofline b1",
           "ours b8 tok/s", "b8/b1", "HF b8 tok/s", "prefill tok/s"], rows)
    console.print("targets (124M): ours/HF b1 >= 2, roofline >= 60%, b8/b1 >= 5")


def llama_cpp_rate(llm, prompt: list[int], new: int) -> float:
    """Greedy tok/s in llama.cpp: the prompt, then `new` tokens one at a time (argmax of each step's logits)."""
    import numpy as np

    start = time.perf_counter()
    llm.reset()
    llm.eval(prompt)
    for _ in range(new):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return new / (time.perf_counter() - start)


def llama_cpp_round(models: list[Transformer], engines: list, prompt: list[int], new: int) -> list[float]:
    """One interleaved round: tok/s of each llmcli model, then of each llama.cpp engine."""
    return [ours(m, [prompt], new) for m in models] + [llama_cpp_rate(e, prompt, new) for e in engines]


def llama_cpp_table(args: argparse.Namespace) -> None:
    """llmcli float32 / int8 beside llama.cpp f32 / q8_0 on the same weights, batch 1, THREADS threads."""
    try:
        import llama_cpp
    except ImportError:
        console.print("llama.cpp table skipped: llama_cpp is not installed (pip install -e '.[gguf]', about 4.5 "
                      "minutes to build; make test-gguf does it)")
        return
    from llmcli.checkpoint import load_model
    from llmcli.llamacpp.export import export_gguf
    from llmcli.quantize.modules import quantization_entry, quantize_model

    torch.set_num_threads(THREADS)
    rows = []
    for name, shape in LLAMA_CPP_SHAPES.items():
        torch.manual_seed(0)
        cfg = build_config({"model": shape}).model
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            _write_checkpoint(Transformer(cfg).eval(), cfg, root / "f32")
            model = load_model(root / "f32").eval()
            _save(quantize_model(load_model(root / "f32"), quantization_entry("int8", include_embeddings=True)), cfg,
                  root / "f32", root / "int8")
            export_gguf(ExportOptions(run_dir=root / "f32", out=root / "f32.gguf", format="gguf"))
            export_gguf(ExportOptions(run_dir=root / "int8", out=root / "q8_0.gguf", format="gguf"))
            engines = [llama_cpp.Llama(str(root / f"{kind}.gguf"), n_ctx=cfg.block_size, n_threads=THREADS,
                                       n_threads_batch=THREADS, verbose=False) for kind in ("f32", "q8_0")]
            int8 = load_model(root / "int8").eval()  # as llmcli generate loads it
            prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
            llama_cpp_round([model, int8], engines, prompt, 4)  # warm-up
            rounds = [llama_cpp_round([model, int8], engines, prompt, args.new) for _ in range(args.repeat)]
            f32, i8, cpp_f32, cpp_q8 = zip(*rounds, strict=True)
            for engine in engines:
                engine.close()
        rows.append([name, f"{Transformer.param_count(cfg) / 1e6:.2f}M", Spread.of(f32), Spread.of(i8), Spread.of(cpp_f32),
                     Spread.of(cpp_q8), ratios(f32, cpp_f32), ratios(i8, cpp_q8)])
    table(f"Decode vs llama.cpp (llama-cpp-python {llama_cpp.__version__}), batch 1, {THREADS} threads, greedy, {args.prompt}-token "
          f"prompt + {args.new} new tokens, random weights; tok/s median (min-max) of {args.repeat} interleaved "
          "rounds", ["model", "params", "llmcli f32", "llmcli int8", "llama.cpp f32", "llama.cpp q8_0",
                     "llmcli/llama.cpp f32", "llmcli int8/q8_0"], rows)


def _save(model: Transformer, cfg: ModelConfig, like: Path, directory: Path) -> None:
    """`model` as a checkpoint with the tokenizer of checkpoint `like`."""
    from llmcli.checkpoint import write_checkpoint
    from llmcli.config import Config

    write_checkpoint(directory, model, Config(model=cfg), (like / "tokenizer.json").read_bytes(), {"step": 0})


def _write_checkpoint(model: Transformer, cfg: ModelConfig, directory: Path) -> None:
    from llmcli.checkpoint import write_checkpoint
    from llmcli.config import Config
    from llmcli.tokenizer import save_tokenizer, train_tokenizer

    tokenizer_path = directory.parent / "tokenizer.json"
    save_tokenizer(train_tokenizer(Config().tokenizer, ["abc"]), tokenizer_path)
    write_checkpoint(directory, model, Config(model=cfg), tokenizer_path.read_bytes(), {"step": 0})


if __name__ == "__main__":
    main()
