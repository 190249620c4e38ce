"""Shared fixtures: a fresh llmcli cache per test, tiny models and checkpoints, the CLI runner and the
one-line-error check every command's tests use."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import torch
from typer.testing import CliRunner

from llmcli.checkpoint import write_checkpoint
from llmcli.config import PRESETS, Config, ModelConfig, TokenizerConfig
from llmcli.config_loader import load_config
from llmcli.models.base import LanguageModel
from llmcli.models.recurrent import Recurrent
from llmcli.models.registry import build_model
from llmcli.models.transformer import Transformer
from llmcli.tokenizer import save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "ROMEO:\nBut, soft! what light through yonder window breaks?\n") * 3


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """A fresh LLMCLI_CACHE_DIR for this test (prepared data, datasets' cache for local files)."""
    path = tmp_path_factory.mktemp("llmcli-cache")
    monkeypatch.setenv("LLMCLI_CACHE_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Tests use tiny models, where extra threads only add contention (and noise) on small CI boxes;
    commands see OMP_NUM_THREADS=1 as a user's setting and keep it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Each test trains as a new process would: Accelerate keeps one state per process (its mixed
    precision among it), so forget whatever an earlier test in this process set up."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()


@pytest.fixture
def sample_txt() -> Path:
    """data/sample.txt: a few Shakespeare sonnets, about 5 KB."""
    return REPO / "data" / "sample.txt"


@pytest.fixture
def tiny_model() -> Callable[..., Transformer]:
    """tiny_model(vocab, preset=, seed=, std=, **config): a 2-layer, 32-wide random Transformer in
    eval mode. `std` redraws every matrix with that spread (large weights keep logits far from ties)."""

    def make(vocab: int = 50, *, preset: str | None = "gpt2", seed: int = 0, std: float | None = None,
             **overrides) -> Transformer:
        fields = dict(PRESETS[preset], preset=preset) if preset else {}
        fields.update(n_layer=2, n_head=4, d_model=32, block_size=96, vocab_size=vocab)
        fields.update(overrides)
        torch.manual_seed(seed)
        return _redrawn(Transformer(ModelConfig(**fields)).eval(), std)

    return make


def _redrawn(model, std: float | None):
    """The model with every matrix redrawn with spread `std` (unchanged when None)."""
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return model


@pytest.fixture(scope="session")
def perturb() -> Callable[..., torch.nn.Module]:
    """perturb(module, seed=0): large random weights (norms and biases too) so the mapping is really
    tested and greedy decoding has clear winners instead of near-ties; the module in eval mode."""

    def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                else:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        return module.eval()

    return perturb


RECURRENT_ARCHES = ("lstm", "gru", "rnn")


@pytest.fixture
def tiny_recurrent() -> Callable[..., Recurrent]:
    """tiny_recurrent(arch, vocab, seed=, std=, **config): a 2-layer, 32-wide random recurrent
    model in eval mode (`std` redraws every matrix with that spread, as for tiny_model)."""

    def make(arch: str = "lstm", vocab: int = 50, *, seed: int = 0, std: float | None = None,
             **overrides) -> Recurrent:
        fields = dict(arch=arch, n_layer=2, d_model=32, block_size=32, vocab_size=vocab)
        fields.update(overrides)
        torch.manual_seed(seed)
        return _redrawn(Recurrent(ModelConfig(**fields)).eval(), std)

    return make


SEQ2SEQ_ARCHES = ("encoder-decoder", "gru-seq2seq", "lstm-seq2seq")


@pytest.fixture
def tiny_seq2seq() -> Callable[..., LanguageModel]:
    """tiny_seq2seq(arch, vocab, src_vocab, seed=, std=, **config): a 2 + 2-layer, 32-wide random
    sequence-to-sequence model in eval mode (`std` as for tiny_model)."""

    def make(arch: str = "encoder-decoder", vocab: int = 40, src_vocab: int = 30, *, seed: int = 0,
             std: float | None = None, **overrides) -> LanguageModel:
        fields = dict(arch=arch, n_layer=2, d_model=32, block_size=24, source_block_size=20, vocab_size=vocab,
                      src_vocab_size=src_vocab)
        if arch == "encoder-decoder":
            fields.update(n_head=4, pos="sinusoidal", act="relu")
        fields.update(overrides)
        torch.manual_seed(seed)
        return _redrawn(build_model(ModelConfig(**fields)).eval(), std)

    return make


@pytest.fixture
def char_tokenizer():
    """A char tokenizer trained on a few lines of Shakespeare (TEXT)."""
    return train_tokenizer(TokenizerConfig(kind="char"), [TEXT])


@pytest.fixture
def write_run() -> Callable[..., Path]:
    """write_run(directory, model, tokenizer, cfg=None, info=None): a complete checkpoint directory."""

    def write(directory: Path, model: torch.nn.Module, tokenizer, cfg: Config | None = None,
              info: dict | None = None) -> Path:
        tok_path = directory.parent / f"{directory.name}-tokenizer.json"
        save_tokenizer(tokenizer, tok_path)
        cfg = cfg or Config()
        cfg = Config(data=cfg.data, tokenizer=cfg.tokenizer, model=model.config, train=cfg.train)
        write_checkpoint(directory, model, cfg, tok_path.read_bytes(), info or {"step": 7})
        return directory

    return write


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory) -> dict[str, Path]:
    """Briefly trained tiny runs on a small corpus, by name: "gpt2" (tied, biases), "llama" (untied,
    SwiGLU), and "lstm", "gru", "rnn" (2 x 32, tied)."""
    from llmcli.train.loop import train
    from llmcli.train.run_dir import RunPlan

    root = tmp_path_factory.mktemp("trained-runs")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"LINE {i}: the quick brown fox jumps over the lazy dog, and so on {i % 7}.\n"
                              for i in range(600)))
    common = [f"data.source={corpus}", f"data.cache_dir={root / 'cache'}", "model.n_layer=2", "model.d_model=32",
              "model.block_size=32", "train.batch_size=8", "train.max_steps=60", "train.warmup_steps=5",
              "train.eval_interval=60", "train.eval_batches=2", "train.log_interval=60"]
    families = {preset: [f"model.preset={preset}", "model.n_head=2", "train.lr=3e-3"] for preset in ("gpt2", "llama")}
    families.update({arch: [f"model.arch={arch}", "train.lr=1e-2"] for arch in RECURRENT_ARCHES})
    runs = {}
    for name, extra in families.items():
        train(RunPlan(load_config(None, [*common, *extra]), root / name))
        runs[name] = root / name
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return runs


@pytest.fixture(scope="session")
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """torchrun(*args, processes=2): `llmcli *args` in that many CPU (gloo) processes under
    torch.distributed.run, on a free port, one thread each; the finished process (stderr kept)."""

    def launch(*args, processes: int = 2) -> subprocess.CompletedProcess:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(port), "-m", "llmcli", *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    return launch


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """A JSONL of 400 pairs: a short lower-case word -> its letters reversed, upper-case, spaced."""
    import json
    import random

    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(600)})[:400]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"source": w, "target": " ".join(reversed(w.upper()))}) + "\n" for w in words))
    return path


@pytest.fixture(scope="session")
def seq2seq_runs(tmp_path_factory, pairs_file) -> dict[str, Path]:
    """Briefly trained runs on `pairs_file` (chars in, `word` tokens out), by model.arch:
    "encoder-decoder" (2 + 2 layers, 32 wide) and "gru-seq2seq"."""
    from llmcli.train.loop import train
    from llmcli.train.run_dir import RunPlan

    root = tmp_path_factory.mktemp("seq2seq-runs")
    common = [f"data.source={pairs_file}", f"data.cache_dir={root / 'cache'}", "data.task=seq2seq",
              "data.val_fraction=0.1", "data.test_fraction=0.1", "tokenizer.kind=word", "source_tokenizer.kind=char",
              "model.n_layer=2", "model.d_model=32", "model.block_size=12", "train.batch_size=16",
              "train.max_steps=40", "train.warmup_steps=5", "train.eval_interval=40", "train.eval_batches=2",
              "train.log_interval=40", "train.lr=3e-3"]
    runs = {}
    for arch, extra in {"encoder-decoder": ["model.n_head=4"], "gru-seq2seq": []}.items():
        train(RunPlan(load_config(None, [*common, f"model.arch={arch}", *extra]), root / arch))
        runs[arch] = root / arch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return runs


@pytest.fixture(scope="session")
def g2p_run(tmp_path_factory) -> Path:
    """A tiny G2P encoder-decoder (2 + 2 layers, 64 wide, 4 heads) trained for 400 steps (about
    15 s on 2 cores) on 4,000 CMUdict words of 3-8 letters: letters in, phonemes (no stress) out."""
    import json
    import random

    from llmcli.data.cmudict import cmudict_pairs
    from llmcli.train.loop import train
    from llmcli.train.run_dir import RunPlan

    root = tmp_path_factory.mktemp("g2p")
    pairs = [(w, p) for w, p in cmudict_pairs(stress=False) if w.isalpha() and 3 <= len(w) <= 8]
    random.Random(0).shuffle(pairs)
    (root / "pairs.jsonl").write_text("".join(json.dumps({"source": w, "target": p}) + "\n" for w, p in pairs[:4000]))
    train(RunPlan(load_config(None, [
        f"data.source={root / 'pairs.jsonl'}", f"data.cache_dir={root / 'cache'}", "data.task=seq2seq",
        "data.val_fraction=0.05", "tokenizer.kind=word", "source_tokenizer.kind=char", "model.n_layer=2",
        "model.d_model=64", "model.n_head=4", "model.block_size=16", "model.source_block_size=12",
        "train.batch_size=32", "train.max_steps=400", "train.warmup_steps=20", "train.eval_interval=400",
        "train.eval_batches=4", "train.log_interval=400", "train.lr=3e-3"]), root / "run"))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return root / "run"


@pytest.fixture
def cli():
    """cli("generate", run, "ROMEO:", input=...): run llmcli in-process; the click Result."""
    from llmcli.cli import app

    runner = CliRunner()

    def invoke(*args, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


@pytest.fixture
def one_line_error():
    """one_line_error(result, *fragments, alone=False): the command failed with exit code 2, no
    traceback, and one `error:` line on stderr (its last line; with `alone`, its only line)
    containing every fragment."""

    def check(result, *fragments: str, alone: bool = False) -> str:
        assert result.exit_code == 2, (result.exit_code, result.output)
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr
        assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
        if alone:
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        for fragment in fragments:
            assert fragment in errors[0], errors[0]
        return errors[0]

    return check


# --------------------------------------------------------------------------------------------
# Fine-tuning and chat: a Llama-style tokenizer, instruction data, a LoRA run


@pytest.fixture(scope="session")
def llama_tokenizer():
    """A Llama-style tokenizer built here (no hub): byte-level BPE whose special tokens are <unk> (0),
    <s> (1) and </s> (2), with no <|endoftext|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    return tok


# What instruction data looks like to the trained_runs' char tokenizer (only characters it saw).
INSTRUCTIONS = [{"instruction": f"say {word}", "input": "", "output": f"the {word}"}
                for word in ("fox", "dog", "brown", "quick", "lazy", "line", "jumps", "over")]


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    """A small Alpaca .json file (INSTRUCTIONS, three times over)."""
    import json

    path = tmp_path_factory.mktemp("alpaca") / "instructions.json"
    path.write_text(json.dumps(INSTRUCTIONS * 3))
    return path


@pytest.fixture(scope="session")
def lora_run(trained_runs, alpaca_file, tmp_path_factory) -> Path:
    """A LoRA adapter (r=4 on q, v, up) trained on the llama-style trained run with alpaca_file."""
    from llmcli.options.training import TrainOptions
    from llmcli.train.loop import train
    from llmcli.train.run_dir import plan_run

    out = tmp_path_factory.mktemp("lora") / "run"
    cache = tmp_path_factory.mktemp("lora-cache")
    opts = TrainOptions(out=out, init_from=trained_runs["llama"], overrides=[
        f"data.source={alpaca_file}", "data.format=alpaca", f"data.cache_dir={cache}", "data.val_fraction=0.2",
        "train.lora.r=4", "train.lora.targets=[q,v,up]", "train.max_steps=30", "train.batch_size=8",
        "train.lr=1e-2", "train.warmup_steps=2", "train.eval_interval=15", "train.eval_batches=2",
        "train.log_interval=15"])
    train(plan_run(opts))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return out


@pytest.fixture
def read_png():
    """read_png(path, min_size=(w, h)): the PNG at `path` read back as an RGB array [h, w, 3],
    after checking it is a real PNG of at least that size and not a blank image."""
    import numpy as np
    from PIL import Image

    def read(path: Path, min_size: tuple[int, int] = (200, 150)):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= min_size[0] and image.height >= min_size[1], image.size
            pixels = np.asarray(image.convert("RGB"))
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert len(colours) > 20 and pixels.std() > 10, "a blank or nearly uniform image"
        return pixels

    return read


def json_valid(text: str, schema: dict) -> bool:
    """Whether `text` parses as JSON and matches `schema` (what constrained decoding promises)."""
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True
