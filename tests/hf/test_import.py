"""Tests for llmcli/hf/importer.py: `transformers` folders and hub ids -> llmcli checkpoints.

Parity with `transformers` for folders its `save_pretrained` wrote; the rest (round trips, errors,
weight file formats) needs no `transformers`: an exported folder is a valid source for import.
"""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from llmcli.checkpoint import load_model
from llmcli.errors import FieldError, UserError
from llmcli.hf.export import export_hf
from llmcli.hf.importer import import_hf
from llmcli.options.checkpoints import ExportOptions, ImportOptions
from llmcli.options.fields import flag_names
from llmcli.tokenizer import EOT


def random_hf_model(transformers, kind: str, vocab: int):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
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
def test_import_of_save_pretrained_matches_transformers(tmp_path, transformers, bpe_json, vocab, perturb,
                                                        check_parity, kind, expected):
    hf = perturb(random_hf_model(transformers, kind, vocab))
    hf.save_pretrained(tmp_path / "src")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_json), eos_token=EOT)
    tok.save_pretrained(tmp_path / "src")
    result = import_hf(ImportOptions(source=str(tmp_path / "src"), out=tmp_path / "ckpt"))
    assert result.warnings == [] and result.eos_token == EOT
    config = result.config
    for key, value in expected.items():
        assert getattr(config, key) == value, key
    assert (config.vocab_size, config.block_size, config.n_layer) == (vocab, 64, 2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "README.md", "checkpoint.json", "config.yaml", "generation_config.json", "model.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]  # the source's end tokens and chat template kept
    info = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert info["imported_from"] == str(tmp_path / "src") and info["eos_token_id"] == 0
    from llmcli.config_loader import load_config

    assert load_config(tmp_path / "ckpt" / "config.yaml").model == config
    ours = load_model(tmp_path / "ckpt").eval()
    assert ours.config == config
    check_parity(ours, hf.eval(), f"import {kind}")


# --- round trips and file formats (no transformers needed) -------------------------------------


@pytest.mark.parametrize("preset,extra", [
    pytest.param("gpt2", {"d_ff": 80, "dropout": 0.1, "norm_eps": 1e-6}, id="gpt2"),
    pytest.param("gpt2", {"tie_embeddings": False}, id="gpt2-untied"),
    pytest.param("llama", {"n_kv_head": 2, "d_ff": 96, "rope_theta": 500.0}, id="llama-gqa"),
    pytest.param("llama", {"tie_embeddings": True, "block_size": 100}, id="llama-tied"),
])
def test_export_import_round_trip_is_bit_exact(tmp_path, bpe_json, make_model, save_run, state_equal, preset,
                                               extra):
    model = make_model(preset, **extra)
    export_hf(ExportOptions(run_dir=save_run(tmp_path / "run", model, bpe_json), out=tmp_path / "hf"))
    result = import_hf(ImportOptions(source=str(tmp_path / "hf"), out=tmp_path / "back"))
    assert result.config == model.config
    back = load_model(tmp_path / "back")
    assert back.config == model.config
    state_equal(back.state_dict(), model.state_dict())
    assert (back.lm_head.weight is back.tok_embed.weight) == model.config.tie_embeddings
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == bpe_json.read_bytes()
    # the mapping itself, both ways in memory: test_mapping.py


def test_bfloat16_export_and_dtype_options(tmp_path, bpe_json, make_model, save_run, state_equal):
    model = make_model("gpt2")
    export_hf(ExportOptions(run_dir=save_run(tmp_path / "run", model, bpe_json), out=tmp_path / "hf",
                            dtype="bfloat16"))
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "hf" / "model.safetensors").values())
    hf = str(tmp_path / "hf")
    assert import_hf(ImportOptions(source=hf, out=tmp_path / "keep", dtype="auto")).dtype == "bfloat16"
    state_equal(load_model(tmp_path / "keep").state_dict(),
                {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    assert import_hf(ImportOptions(source=hf, out=tmp_path / "f32")).dtype == "float32"  # the default
    with pytest.raises(FieldError) as err:
        import_hf(ImportOptions(source=hf, out=tmp_path / "x", dtype="int8"))
    assert err.value.render(flag_names(ImportOptions).get).startswith("--dtype must be one of")


def test_import_sharded_safetensors_and_pytorch_bin(tmp_path, bpe_json, export_dir, state_equal):
    model, hf = export_dir(tmp_path, bpe_json, n_kv_head=2)
    tensors = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, hf / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    import_hf(ImportOptions(source=str(hf), out=tmp_path / "sharded"))
    state_equal(load_model(tmp_path / "sharded").state_dict(), model.state_dict())

    for shard in shards:
        (hf / shard).unlink()
    (hf / "model.safetensors.index.json").unlink()
    torch.save(tensors, hf / "pytorch_model.bin")
    import_hf(ImportOptions(source=str(hf), out=tmp_path / "bin"))
    state_equal(load_model(tmp_path / "bin").state_dict(), model.state_dict())


class _Evil:
    """Unpickling this would create a file: weights_only=True must refuse to."""

    marker: Path

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pytorch_bin_is_read_with_weights_only(tmp_path, bpe_json, export_dir):
    _, hf = export_dir(tmp_path, bpe_json)
    tensors = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    torch.save({**tensors, "evil": evil}, hf / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin: refusing to load.*weights_only=True"):
        import_hf(ImportOptions(source=str(hf), out=tmp_path / "out"))
    assert not evil.marker.exists() and not (tmp_path / "out").exists()


def test_import_gpt2_hub_layout_without_prefix_and_with_vocab_merges(tmp_path, bpe_json, shakespeare,
                                                                     unicode_text, export_dir, state_equal):
    """The hub's `gpt2` stores GPT2Model names (no `transformer.`), attn.bias buffers, vocab.json +
    merges.txt; all of that imports."""
    model, hf = export_dir(tmp_path, bpe_json, "gpt2")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(hf / "model.safetensors").items()}
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    (hf / "tokenizer.json").unlink()
    Tokenizer.from_file(str(bpe_json)).model.save(str(hf))  # vocab.json + merges.txt
    import_hf(ImportOptions(source=str(hf), out=tmp_path / "ckpt"))
    state_equal(load_model(tmp_path / "ckpt").state_dict(), model.state_dict())
    ours = Tokenizer.from_file(str(bpe_json))
    rebuilt = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    for text in (shakespeare, unicode_text):
        assert rebuilt.encode(text).ids == ours.encode(text).ids
    assert rebuilt.decode(rebuilt.encode(unicode_text).ids, skip_special_tokens=False) == unicode_text


def test_tokenizer_without_endoftext_records_the_eos_token(tmp_path, bpe_json, shakespeare, vocab, export_dir):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([shakespeare[:50_000]], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    _, hf = export_dir(tmp_path, bpe_json)
    tok.save(str(hf / "tokenizer.json"))
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "bos_token_id": 1, "eos_token_id": 2}))
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf / name).unlink()
    result = import_hf(ImportOptions(source=str(hf), out=tmp_path / "ckpt"))
    assert result.eos_token_id == 2 and result.eos_token == "</s>"
    assert any("no <|endoftext|>" in w and "'</s>' (id 2)" in w for w in result.warnings)
    info = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert (info["eos_token_id"], info["bos_token_id"], info["eos_token"]) == (2, 1, "</s>")
    # ... and exporting it again keeps those ids
    export_hf(ExportOptions(run_dir=tmp_path / "ckpt", out=tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text()) == \
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tokenizer_config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"], tokenizer_config["unk_token"]) == \
        ("<s>", "</s>", "<unk>")


# --- refusals ---------------------------------------------------------------------------------


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
def test_import_refuses_what_our_model_cannot_reproduce(tmp_path, bpe_json, export_dir, edit_config, changes,
                                                        fragment):
    _, hf = export_dir(tmp_path, bpe_json)
    edit_config(hf, **changes)
    with pytest.raises(UserError) as err:
        import_hf(ImportOptions(source=str(hf), out=tmp_path / "out"))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_import_refuses_gpt2_variants_and_missing_or_extra_tensors(tmp_path, bpe_json, export_dir, edit_config):
    _, hf = export_dir(tmp_path, bpe_json, "gpt2")
    opts = ImportOptions(source=str(hf), out=tmp_path / "out")
    edit_config(hf, activation_function="relu")
    with pytest.raises(UserError, match="GPT2LMHeadModel with activation_function=relu"):
        import_hf(opts)
    edit_config(hf, activation_function="gelu_new", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx=true"):
        import_hf(opts)
    edit_config(hf, scale_attn_by_inverse_layer_idx=False)
    tensors = load_file(hf / "model.safetensors")
    missing = dict(tensors)
    del missing["transformer.h.1.mlp.c_fc.weight"], missing["transformer.ln_f.bias"]
    save_file(missing, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.safetensors is missing tensors: transformer\.h\.1\.mlp\.c_fc"
                                        r"\.weight, transformer\.ln_f\.bias"):
        import_hf(opts)
    save_file({**tensors, "score.weight": torch.zeros(2, 32)}, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="does not use: score.weight"):
        import_hf(opts)
    (hf / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights in"):
        import_hf(opts)
    assert not (tmp_path / "out").exists()


def test_hub_ids_go_through_snapshot_download(tmp_path, bpe_json, export_dir, state_equal, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model, hf = export_dir(tmp_path, bpe_json)
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(hf)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    result = import_hf(ImportOptions(source="someone/tiny-llama", out=tmp_path / "ckpt"))
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
        import_hf(ImportOptions(source="gpt2", out=tmp_path / "gpt2"))
    assert "gpt2 is not a local folder, and downloading it from the Hugging Face hub failed: Got: " \
           "ConnectError" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="import source not found: ./nope/x"):
        import_hf(ImportOptions(source="./nope/x", out=tmp_path / "x"))
