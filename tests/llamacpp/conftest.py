"""Fixtures of the GGUF tests: text a tokenizer can trip on, byte-level BPE and char tokenizers that saw
it, perturbed tiny checkpoints, a briefly trained one, and llama.cpp (llama-cpp-python) loading an
exported file the way the parity tests need it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from llmcli.config import Config, TokenizerConfig
from llmcli.llamacpp.export import export_gguf
from llmcli.options.checkpoints import ExportOptions
from llmcli.tokenizer import EOT, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parent.parent.parent
# ASCII prose, Chinese, emoji (a ZWJ family, a skin tone), code, runs of spaces, tabs and newlines,
# the end token in the text, accents (composed and combining), and a CRLF.
VARIED = ("ROMEO: But, soft! what light through yonder window breaks? It's 3.14159, isn't it?\n"
          "东京的天气很好。我们今天去公园吧！中文分词测试\n"
          "Emoji: 🤖🎉👍🏽 👨‍👩‍👧 ❤️\n"
          "def greet(name: str) -> str:\n    return f\"Hello, {name}!\"  # code\n"
          "\tindent\t\ttabs   and      spaces    \n\n\n   trailing   " + EOT + " after the end token\r\n"
          "naïve café — Ωμέγα Привет e\u0301 \u200b end")


@pytest.fixture(scope="session")
def corpus() -> str:
    """Shakespeare's sonnets (data/sample.txt) and VARIED: every character of VARIED is seen."""
    return (REPO / "data" / "sample.txt").read_text(encoding="utf-8") + VARIED


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory, corpus) -> dict[str, Path]:
    """tokenizer.json files by kind: "bpe" (byte-level, 300 tokens), "char" and "word", trained on `corpus`."""
    root = tmp_path_factory.mktemp("gguf-tok")
    out = {}
    for kind in ("bpe", "char", "word"):
        out[kind] = root / f"{kind}.json"
        save_tokenizer(train_tokenizer(TokenizerConfig(kind=kind, vocab_size=300), [corpus]), out[kind])
    return out


@pytest.fixture
def make_run(tmp_path, tiny_model, perturb, tokenizer_files) -> Callable[..., Path]:
    """make_run(preset, kind="bpe", name=..., **config): a checkpoint of a perturbed 2-layer, 64-wide
    model (context 128) with the `kind` tokenizer, in tmp_path/name."""
    from llmcli.checkpoint import write_checkpoint

    def make(preset: str, kind: str = "bpe", name: str | None = None, **overrides) -> Path:
        tok = tokenizer_files[kind]
        from llmcli.tokenizer import load_tokenizer

        vocab = load_tokenizer(tok).get_vocab_size()
        fields = {"d_model": 64, "block_size": 128, **overrides}
        model = perturb(tiny_model(vocab, preset=preset, **fields))
        out = tmp_path / (name or f"{preset}-{kind}")
        write_checkpoint(out, model, Config(model=model.config), tok.read_bytes(), {"step": 1})
        return out

    return make


@pytest.fixture
def lora_checkpoint(tmp_path, make_run):
    """lora_checkpoint(preset, targets): (base run, adapter run) with large random LoRA factors."""
    from llmcli.checkpoint import BASE, base_pointer, load_model, write_checkpoint
    from llmcli.config import LoraConfig
    from llmcli.lora import add_adapter

    def make(preset: str, targets: list[str]) -> tuple[Path, Path]:
        base = make_run(preset, name=f"base-{preset}", tie_embeddings=False)
        model = load_model(base)
        add_adapter(model, LoraConfig(r=4, alpha=8.0, targets=targets))
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        out = tmp_path / f"lora-{preset}"
        write_checkpoint(out, model, Config(model=model.config), (base / "tokenizer.json").read_bytes(), {"step": 1},
                         {BASE: base_pointer(base)})
        return base, out

    return make


@pytest.fixture
def export() -> Callable[..., Path]:
    """export(run, out, **options): `llmcli export RUN --format gguf --out OUT`; the file."""

    def run(src: Path, out: Path, **options) -> Path:
        export_gguf(ExportOptions(run_dir=src, out=out, format="gguf", **options))
        return out

    return run


@pytest.fixture(scope="session")
def trained_char_runs(tmp_path_factory) -> dict[str, Path]:
    """Char models (2 layers, 64 wide, context 128) trained for 600 steps on the sonnets, by preset
    ("llama", "gpt2"): real, peaked-but-not-certain predictions for the comparisons that need them."""
    from llmcli.config_loader import load_config
    from llmcli.train.loop import train
    from llmcli.train.run_dir import RunPlan

    root = tmp_path_factory.mktemp("gguf-trained")
    runs = {}
    for preset in ("llama", "gpt2"):
        train(RunPlan(load_config(None, [
            f"data.source={REPO / 'data' / 'sample.txt'}", f"data.cache_dir={root / 'cache'}", "tokenizer.kind=char",
            f"model.preset={preset}", "model.n_layer=2", "model.n_head=4", "model.d_model=64",
            "model.block_size=128", "train.batch_size=16", "train.max_steps=600", "train.warmup_steps=20",
            "train.lr=3e-3", "train.eval_interval=600", "train.eval_batches=2", "train.log_interval=600"]),
            root / preset))
        runs[preset] = root / preset
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return runs


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python (the `.[gguf]` extra, `make test-gguf`); tests that need it skip without it."""
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="session")
def load_gguf(llama_cpp) -> Callable[..., Iterator]:
    """with load_gguf(path, lora=None) as llm: the file in llama.cpp, float32 KV cache, no flash
    attention (llama.cpp's defaults keep keys and values in float16), all logits kept, 1 thread."""

    @contextmanager
    def load(path: Path, lora: Path | None = None, context: int = 256):
        llm = llama_cpp.Llama(str(path), n_ctx=context, logits_all=True, verbose=False, n_threads=1,
                              n_threads_batch=1, type_k=0, type_v=0, flash_attn=False,
                              lora_path=None if lora is None else str(lora))
        try:
            yield llm
        finally:
            llm.close()

    return load


@pytest.fixture
def ggml_gelu(monkeypatch) -> Callable[[], object]:
    """with ggml_gelu(): GELU computed as ggml's CPU backend does (GGML_GELU_FP16): the input rounded to
    float16, the tanh GELU of that looked up in a float16 table, 0 below -10 and x above 10."""
    import torch.nn.functional as F

    exact = F.gelu

    def table_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        del approximate  # ggml's table is the tanh approximation whatever the caller asks
        y = exact(x.to(torch.float16).float(), approximate="tanh").to(torch.float16).float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    @contextmanager
    def patched():
        with monkeypatch.context() as m:
            m.setattr(F, "gelu", table_gelu)
            yield

    return patched
