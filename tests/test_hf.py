"""Tests for llmcli/hf.py and `llmcli export` / `llmcli import`: Hugging Face interop.

Parity with `transformers` (a test-only dependency) in both directions: logits to 1e-4 in float32,
identical 32-token greedy continuations, identical tokenizer ids. The rest (round trips, errors,
file formats) needs no `transformers`: an exported folder is a valid HF source for import.
"""

from __future__ import annotations

import json
import pathlib
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from typer.testing import CliRunner

from llmcli.checkpoint import write_checkpoint
from llmcli.cli import app
from llmcli.config import PRESETS, Config, ModelConfig, TokenizerConfig
from llmcli.errors import UserError
from llmcli.hf import export_hf, import_hf, state_dict_from_hf, state_dict_to_hf
from llmcli.model import Transformer, load_model
from llmcli.tokenizer import EOT, save_tokenizer, train_tokenizer

VOCAB = 300
PLAYS = ("macbeth", "hamlet", "the-tempest")


def make_config(preset: str, **overrides) -> ModelConfig:
    fields = dict(PRESETS[preset], preset=preset, n_layer=2, n_head=4, d_model=32, vocab_size=VOCAB,
                  block_size=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large random weights (norms and biases too) so the mapping is really tested and greedy
    decoding has clear winners instead of near-ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def make_model(preset: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return perturb(Transformer(make_config(preset, **overrides)), seed)


def write_run(path: Path, model: Transformer, tokenizer: Path, info: dict | None = None) -> Path:
    write_checkpoint(path, model, Config(model=model.config), tokenizer, info or {"step": 1})
    return path


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def shakespeare() -> str:
    try:
        from llmcli.data import markdown_to_text, shakespeare_plays

        plays = shakespeare_plays()
        return "".join(markdown_to_text(plays[name].read_text(encoding="utf-8")) for name in PLAYS)
    except Exception:  # data.py still changing: any plain English will do
        return "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 50


@pytest.fixture(scope="module")
def unicode_text() -> str:
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0x0, 0x1F), (0x300, 0x36F)]
    chars = [chr(rng.randint(*ranges[rng.randrange(len(ranges))])) for _ in range(3000)]
    return ("naïve café — 東京 🤖 Ωμέγα\t\n  spaces  " + EOT + " Z͑ͫ̓ͪ̂ͫ̽͏̴̙ " + "".join(chars)
            + EOT + "\r\n\u200b\ufeff end")


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory, shakespeare) -> Path:
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    save_tokenizer(train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=VOCAB), [shakespeare[:200_000]]), path)
    return path


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory, shakespeare) -> Path:
    path = tmp_path_factory.mktemp("tok") / "char.json"
    save_tokenizer(train_tokenizer(TokenizerConfig(kind="char"), [shakespeare]), path)
    return path


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def our_greedy(model: Transformer, prompts: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy continuations from llmcli.generate's engine (its KV-cache decoding path)."""
    from llmcli.generate import Engine, SamplingParams

    engine = Engine(model, max_batch_size=len(prompts))
    params = SamplingParams(max_new_tokens=steps, temperature=0.0)
    ids = [engine.add(p.tolist(), params) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for event in engine.step():
            out[event.id].append(event.token)
    return [out[i] for i in ids]


def hf_greedy(transformers, hf, prompts: torch.Tensor, steps: int) -> list[list[int]]:
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None,
                                           pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=config)
    return out[:, prompts.shape[1]:].tolist()


def check_parity(transformers, ours: Transformer, hf, label: str) -> None:
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (3, 48))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    print(f"{label}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    prompts = torch.randint(0, VOCAB, (2, 8))
    ours_tokens, hf_tokens = our_greedy(ours, prompts, 32), hf_greedy(transformers, hf, prompts, 32)
    assert ours_tokens == hf_tokens
    assert all(len(row) == 32 for row in ours_tokens)


# --- export: ours -> transformers ---------------------------------------------------------------

EXPORT_VARIANTS = [
    pytest.param("gpt2", {"d_ff": 80}, "GPT2LMHeadModel", id="gpt2-dff80"),
    pytest.param("gpt2", {"tie_embeddings": False, "dropout": 0.1}, "GPT2LMHeadModel", id="gpt2-untied"),
    pytest.param("llama", {"n_kv_head": 2, "d_ff": 96, "rope_theta": 500.0, "norm_eps": 1e-6},
                 "LlamaForCausalLM", id="llama-gqa-untied"),
    pytest.param("llama", {"n_kv_head": 2, "tie_embeddings": True}, "LlamaForCausalLM", id="llama-gqa-tied"),
]


@pytest.mark.parametrize("preset,extra,arch", EXPORT_VARIANTS)
def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(
        tmp_path, transformers, bpe_tokenizer, preset, extra, arch):
    model = make_model(preset, **extra)
    run = write_run(tmp_path / "run", model, bpe_tokenizer)
    result = export_hf(run, tmp_path / "hf")
    assert result.architecture == arch and result.eos_token_id == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == result.files == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    assert hf.config.vocab_size == VOCAB and hf.config.eos_token_id == 0 and hf.config.bos_token_id == 0
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    if preset == "gpt2":
        assert hf.config.n_inner == model.config.ff_dim and hf.config.n_positions == 64
    else:
        assert hf.config.num_key_value_heads == 2 and hf.config.intermediate_size == model.config.ff_dim
        assert hf.config.rope_parameters["rope_theta"] == model.config.rope_theta
    assert (hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()) == \
        model.config.tie_embeddings
    check_parity(transformers, model, hf, f"export {preset} {extra}")


def test_export_bfloat16_and_generation_config(tmp_path, transformers, bpe_tokenizer):
    model = make_model("llama", n_kv_head=2)
    export_hf(write_run(tmp_path / "run", model, bpe_tokenizer), tmp_path / "hf", dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == \
        {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(hf.model.embed_tokens.weight, model.tok_embed.weight.to(torch.bfloat16).float())


# --- import: transformers -> ours ---------------------------------------------------------------


def random_hf_model(transformers, kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_inner=72, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        return transformers.GPT2LMHeadModel(config)
    llama = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
                 rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **common)
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **llama))
    config = transformers.LlamaConfig(tie_word_embeddings=kind == "llama-tied", **llama)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("kind,expected", [
    ("gpt2", dict(preset="gpt2", d_model=48, d_ff=72, tie_embeddings=True)),
    ("llama", dict(preset="llama", d_model=64, n_kv_head=2, d_ff=96, rope_theta=500.0, tie_embeddings=False)),
    ("llama-tied", dict(preset="llama", d_model=64, n_kv_head=2, tie_embeddings=True)),
    ("mistral", dict(preset="llama", d_model=64, n_kv_head=2)),
])
def test_import_of_save_pretrained_matches_transformers(tmp_path, transformers, bpe_tokenizer, kind, expected):
    hf = perturb(random_hf_model(transformers, kind))
    hf.save_pretrained(tmp_path / "src")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_tokenizer), eos_token=EOT)
    tok.save_pretrained(tmp_path / "src")
    result = import_hf(tmp_path / "src", tmp_path / "ckpt")
    assert result.warnings == [] and result.eos_token == EOT
    config = result.config
    for key, value in expected.items():
        assert getattr(config, key) == value, key
    assert (config.vocab_size, config.block_size, config.n_layer) == (VOCAB, 64, 2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "checkpoint.json", "config.yaml", "model.json", "model.safetensors", "tokenizer.json"]
    info = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert info["imported_from"] == str(tmp_path / "src") and info["eos_token_id"] == 0
    from llmcli.config import load_config

    assert load_config(tmp_path / "ckpt" / "config.yaml").model == config
    ours = load_model(tmp_path / "ckpt").eval()
    assert ours.config == config
    check_parity(transformers, ours, hf.eval(), f"import {kind}")


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_exported_tokenizer_gives_identical_ids(tmp_path, transformers, bpe_tokenizer, char_tokenizer,
                                                shakespeare, unicode_text, kind):
    path = bpe_tokenizer if kind == "bpe" else char_tokenizer
    export_hf(write_run(tmp_path / "run", make_model("gpt2"), path), tmp_path / "hf")
    ours = Tokenizer.from_file(str(path))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token == EOT and theirs.eos_token_id == 0 and theirs.bos_token_id == 0
    assert theirs.model_max_length == 64
    assert theirs.unk_token == ("<unk>" if kind == "char" else EOT)
    for text in (shakespeare, unicode_text):
        ids = ours.encode(text, add_special_tokens=False).ids
        assert theirs(text, add_special_tokens=True)["input_ids"] == ids
        assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    sample = shakespeare[:5000]
    print(f"{kind}: {len(ours.encode(shakespeare).ids)} ids from {len(shakespeare)} characters of "
          f"{', '.join(PLAYS)}; {len(ours.encode(unicode_text).ids)} from {len(unicode_text)} unicode characters")
    if kind == "bpe":  # byte-level: everything round-trips
        assert theirs.decode(theirs(unicode_text)["input_ids"]) == unicode_text
        assert theirs.decode(theirs(sample)["input_ids"]) == sample


# --- round trips and file formats (no transformers needed) -------------------------------------


@pytest.mark.parametrize("preset,extra", [
    pytest.param("gpt2", {"d_ff": 80, "dropout": 0.1, "norm_eps": 1e-6}, id="gpt2"),
    pytest.param("gpt2", {"tie_embeddings": False}, id="gpt2-untied"),
    pytest.param("llama", {"n_kv_head": 2, "d_ff": 96, "rope_theta": 500.0}, id="llama-gqa"),
    pytest.param("llama", {"tie_embeddings": True, "block_size": 100}, id="llama-tied"),
])
def test_export_import_round_trip_is_bit_exact(tmp_path, bpe_tokenizer, preset, extra):
    model = make_model(preset, **extra)
    export_hf(write_run(tmp_path / "run", model, bpe_tokenizer), tmp_path / "hf")
    result = import_hf(tmp_path / "hf", tmp_path / "back")
    assert result.config == model.config
    back = load_model(tmp_path / "back")
    assert back.config == model.config
    state_equal(back.state_dict(), model.state_dict())
    assert (back.lm_head.weight is back.tok_embed.weight) == model.config.tie_embeddings
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == bpe_tokenizer.read_bytes()
    # and the mapping itself, both ways, in memory
    hf_state = state_dict_to_hf(model.state_dict(), model.config)
    state_equal(state_dict_from_hf(hf_state, model.config), model.state_dict())


def test_bfloat16_export_and_dtype_options(tmp_path, bpe_tokenizer):
    model = make_model("gpt2")
    export_hf(write_run(tmp_path / "run", model, bpe_tokenizer), tmp_path / "hf", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "hf" / "model.safetensors").values())
    assert import_hf(tmp_path / "hf", tmp_path / "keep", dtype="auto").dtype == "bfloat16"
    state_equal(load_model(tmp_path / "keep").state_dict(),
                {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    assert import_hf(tmp_path / "hf", tmp_path / "f32").dtype == "float32"  # the default
    with pytest.raises(UserError, match="--dtype must be one of"):
        import_hf(tmp_path / "hf", tmp_path / "x", dtype="int8")


def _export_dir(tmp_path: Path, tokenizer: Path, preset: str = "llama", **extra) -> tuple[Transformer, Path]:
    model = make_model(preset, **extra)
    export_hf(write_run(tmp_path / "run", model, tokenizer), tmp_path / "hf")
    return model, tmp_path / "hf"


def test_import_sharded_safetensors_and_pytorch_bin(tmp_path, bpe_tokenizer):
    model, hf = _export_dir(tmp_path, bpe_tokenizer, n_kv_head=2)
    tensors = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, hf / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    import_hf(hf, tmp_path / "sharded")
    state_equal(load_model(tmp_path / "sharded").state_dict(), model.state_dict())

    for shard in shards:
        (hf / shard).unlink()
    (hf / "model.safetensors.index.json").unlink()
    torch.save(tensors, hf / "pytorch_model.bin")
    import_hf(hf, tmp_path / "bin")
    state_equal(load_model(tmp_path / "bin").state_dict(), model.state_dict())


class _Evil:
    """Unpickling this would create a file: weights_only=True must refuse to."""

    marker: Path

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pytorch_bin_is_read_with_weights_only(tmp_path, bpe_tokenizer):
    _, hf = _export_dir(tmp_path, bpe_tokenizer)
    tensors = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    torch.save({**tensors, "evil": evil}, hf / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin: refusing to load.*weights_only=True"):
        import_hf(hf, tmp_path / "out")
    assert not evil.marker.exists() and not (tmp_path / "out").exists()


def test_import_gpt2_hub_layout_without_prefix_and_with_vocab_merges(tmp_path, bpe_tokenizer, shakespeare,
                                                                     unicode_text):
    """The hub's `gpt2` stores GPT2Model names (no `transformer.`), attn.bias buffers, vocab.json +
    merges.txt; all of that imports."""
    model, hf = _export_dir(tmp_path, bpe_tokenizer, "gpt2")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(hf / "model.safetensors").items()}
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    (hf / "tokenizer.json").unlink()
    Tokenizer.from_file(str(bpe_tokenizer)).model.save(str(hf))  # vocab.json + merges.txt
    import_hf(hf, tmp_path / "ckpt")
    state_equal(load_model(tmp_path / "ckpt").state_dict(), model.state_dict())
    ours = Tokenizer.from_file(str(bpe_tokenizer))
    rebuilt = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    for text in (shakespeare, unicode_text):
        assert rebuilt.encode(text).ids == ours.encode(text).ids
    assert rebuilt.decode(rebuilt.encode(unicode_text).ids, skip_special_tokens=False) == unicode_text


def test_tokenizer_without_endoftext_records_the_eos_token(tmp_path, bpe_tokenizer, shakespeare):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([shakespeare[:50_000]], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    _, hf = _export_dir(tmp_path, bpe_tokenizer)
    tok.save(str(hf / "tokenizer.json"))
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "bos_token_id": 1, "eos_token_id": 2}))
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf / name).unlink()
    result = import_hf(hf, tmp_path / "ckpt")
    assert result.eos_token_id == 2 and result.eos_token == "</s>"
    assert any("no <|endoftext|>" in w and "'</s>' (id 2)" in w for w in result.warnings)
    info = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert (info["eos_token_id"], info["bos_token_id"], info["eos_token"]) == (2, 1, "</s>")
    # ... and exporting it again keeps those ids
    export_hf(tmp_path / "ckpt", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text()) == \
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tokenizer_config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"], tokenizer_config["unk_token"]) == \
        ("<s>", "</s>", "<unk>")


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,extra,fragments", [
    ("gpt2", {"pos": "rope"}, ["model.pos=rope cannot be exported as GPT-2",
                               "model.norm=layernorm, model.act=gelu, model.bias=true cannot be exported as Llama"]),
    ("gpt2", {"n_kv_head": 2}, ["model.n_kv_head=2 cannot be exported as GPT-2"]),
    ("llama", {"bias": True}, ["model.bias=true cannot be exported as Llama"]),
    ("llama", {"act": "gelu"}, ["model.act=gelu cannot be exported as Llama"]),
])
def test_export_refuses_configs_without_a_transformers_counterpart(tmp_path, bpe_tokenizer, preset, extra,
                                                                   fragments):
    run = write_run(tmp_path / "run", make_model(preset, **extra), bpe_tokenizer)
    with pytest.raises(UserError) as err:
        export_hf(run, tmp_path / "hf")
    for fragment in fragments:
        assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written, no temp dirs


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,fragment", [
    ({"architectures": ["BertModel"], "model_type": "bert"}, "architecture BertModel is not supported"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16},
     "MistralForCausalLM with sliding_window=16 is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling rope_type=llama3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters rope_type=yarn"),
    ({"attention_bias": True}, "LlamaForCausalLM with attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act=gelu"),
    ({"head_dim": 16}, "head_dim=16"),
    ({"hidden_size": 64, "head_dim": 16}, "model.embed_tokens.weight has shape (300, 32), but config.json implies (300, 64)"),
])
def test_import_refuses_what_our_model_cannot_reproduce(tmp_path, bpe_tokenizer, changes, fragment):
    _, hf = _export_dir(tmp_path, bpe_tokenizer)
    _edit_config(hf, **changes)
    with pytest.raises(UserError) as err:
        import_hf(hf, tmp_path / "out")
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_import_refuses_gpt2_variants_and_missing_or_extra_tensors(tmp_path, bpe_tokenizer):
    _, hf = _export_dir(tmp_path, bpe_tokenizer, "gpt2")
    _edit_config(hf, activation_function="relu")
    with pytest.raises(UserError, match="GPT2LMHeadModel with activation_function=relu"):
        import_hf(hf, tmp_path / "out")
    _edit_config(hf, activation_function="gelu_new", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx=true"):
        import_hf(hf, tmp_path / "out")
    _edit_config(hf, scale_attn_by_inverse_layer_idx=False)
    tensors = load_file(hf / "model.safetensors")
    missing = dict(tensors)
    del missing["transformer.h.1.mlp.c_fc.weight"], missing["transformer.ln_f.bias"]
    save_file(missing, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.safetensors is missing tensors: transformer\.h\.1\.mlp\.c_fc"
                                        r"\.weight, transformer\.ln_f\.bias"):
        import_hf(hf, tmp_path / "out")
    save_file({**tensors, "score.weight": torch.zeros(2, 32)}, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="does not use: score.weight"):
        import_hf(hf, tmp_path / "out")
    (hf / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights in"):
        import_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_and_overwrite_replaces(tmp_path, bpe_tokenizer):
    model, hf = _export_dir(tmp_path, bpe_tokenizer)
    run = tmp_path / "run"
    before = (hf / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        export_hf(run, hf)
    assert (hf / "model.safetensors").read_bytes() == before
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        import_hf(hf, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["keep.txt"]
    import_hf(hf, tmp_path / "ckpt", overwrite=True)
    assert not (tmp_path / "ckpt" / "keep.txt").exists()
    export_hf(tmp_path / "ckpt", hf, overwrite=True)
    assert (hf / "model.safetensors").read_bytes() == before
    with pytest.raises(UserError, match="would replace the source"):
        export_hf(run, run, overwrite=True)
    with pytest.raises(UserError, match="would replace the source"):
        import_hf(hf, hf, overwrite=True)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_needs_dequantize(tmp_path, bpe_tokenizer, method):
    quantize = pytest.importorskip("llmcli.quantize")
    run = write_run(tmp_path / "run", make_model("llama", n_kv_head=2, d_model=64), bpe_tokenizer)
    quantize.quantize_checkpoint(run, tmp_path / "q", method=method, measure=False)
    with pytest.raises(UserError, match="quantized checkpoint.*--dequantize"):
        export_hf(tmp_path / "q", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_hf(tmp_path / "q", tmp_path / "hf", dequantize=True)
    import_hf(tmp_path / "hf", tmp_path / "back")
    state_equal(load_model(tmp_path / "back").state_dict(),
                quantize.load_dequantized_model(tmp_path / "q").state_dict())


def test_hub_ids_go_through_snapshot_download(tmp_path, bpe_tokenizer, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model, hf = _export_dir(tmp_path, bpe_tokenizer)
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(hf)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    result = import_hf("someone/tiny-llama", tmp_path / "ckpt")
    assert calls[0][0] == "someone/tiny-llama" and len(calls) == 1
    assert {"config.json", "model*.safetensors", "model.safetensors.index.json",
            "tokenizer.json"} <= set(calls[0][1])
    assert result.source == "someone/tiny-llama"
    info = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert info["imported_from"] == "someone/tiny-llama" and info["downloaded_to"] == str(hf)
    state_equal(load_model(tmp_path / "ckpt").state_dict(), model.state_dict())

    def offline(repo_id, allow_patterns):
        raise OSError("Got: ConnectError: Name or service not known\nPlease check your internet connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as err:
        import_hf("gpt2", tmp_path / "gpt2")
    assert "gpt2 is not a local folder, and downloading it from the Hugging Face hub failed: Got: " \
           "ConnectError" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="import source not found: ./nope/x"):
        import_hf("./nope/x", tmp_path / "x")


# --- command line --------------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_export_and_import(tmp_path, bpe_tokenizer):
    model = make_model("llama", n_kv_head=2)
    run = write_run(tmp_path / "run", model, bpe_tokenizer)
    out = invoke("export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert out.exit_code == 0, out.output
    assert "exported LlamaForCausalLM (2 layers, d_model 32, 4 heads / 2 kv" in out.stdout
    assert f"-> {tmp_path / 'hf'}" in out.stdout and "AutoModelForCausalLM.from_pretrained" in out.stdout
    back = invoke("import", tmp_path / "hf", "--out", tmp_path / "back")
    assert back.exit_code == 0, back.output
    assert "imported LlamaForCausalLM" in back.stdout and "as model.preset=llama" in back.stdout
    assert "end-of-text token: '<|endoftext|>' (id 0)" in back.stdout
    state_equal(load_model(tmp_path / "back").state_dict(), model.state_dict())

    assert_one_line_error(invoke("export", run, "--out", tmp_path / "hf"), "already exists", "--overwrite")
    assert_one_line_error(invoke("import", tmp_path / "hf", "--out", tmp_path / "back"), "already exists")
    assert_one_line_error(invoke("export", run, "--format", "onnx", "--out", tmp_path / "x"), "--format must be hf")
    assert_one_line_error(invoke("export", tmp_path / "nope", "--out", tmp_path / "x"), "checkpoint not found")
    assert_one_line_error(invoke("export", run, "--out", tmp_path / "x", "--dtype", "int4"), "--dtype must be one of")
    bad = write_run(tmp_path / "bad", make_model("gpt2", pos="rope"), bpe_tokenizer)
    assert_one_line_error(invoke("export", bad, "--out", tmp_path / "x"), "model.pos=rope cannot be exported as GPT-2")
    _edit_config(tmp_path / "hf", architectures=["BertModel"])
    assert_one_line_error(invoke("import", tmp_path / "hf", "--out", tmp_path / "y"), "BertModel is not supported")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
