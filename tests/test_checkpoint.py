"""Checkpoint directories: save/load round trips, tied weights stored once, errors naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from llmcli.checkpoint import check_output_dir, load_model, model_config_from_json, save_model
from llmcli.errors import UserError

VOCAB = 67


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_model, preset):
    model = tiny_model(VOCAB, preset=preset, seed=3)
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (loaded.lm_head.weight is loaded.tok_embed.weight) == model.config.tie_embeddings
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    half = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert half.tok_embed.weight.dtype == torch.bfloat16
    assert (half.lm_head.weight is half.tok_embed.weight) == model.config.tie_embeddings


@pytest.mark.parametrize("arch,extra", [("lstm", {}), ("gru", {"d_hidden": 48, "tie_embeddings": False}),
                                        ("rnn", {"dropout": 0.1})])
def test_recurrent_round_trip_is_bit_exact_and_saves_only_its_settings(tmp_path, tiny_recurrent, arch, extra):
    from safetensors.torch import load_file

    model = tiny_recurrent(arch, VOCAB, seed=4, **extra)
    save_model(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert saved == model.config.to_dict() and "n_head" not in saved and "norm" not in saved
    assert ("lm_head.weight" in load_file(tmp_path / "ckpt" / "model.safetensors")) == (not model.config.tie_embeddings)
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))
    assert (loaded.lm_head.weight is loaded.tok_embed.weight) == model.config.tie_embeddings
    idx = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    assert load_model(tmp_path / "ckpt", dtype=torch.bfloat16).rnn.weight_hh_l0.dtype == torch.bfloat16


def test_a_tied_weight_is_stored_once(tmp_path, tiny_model):
    from safetensors.torch import load_file

    save_model(tiny_model(VOCAB, preset="gpt2"), tmp_path / "tied")
    save_model(tiny_model(VOCAB, preset="llama"), tmp_path / "untied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    assert "lm_head.weight" in load_file(tmp_path / "untied" / "model.safetensors")


def test_a_model_json_without_arch_loads_as_a_transformer(tmp_path, tiny_model):
    model = tiny_model(VOCAB)
    save_model(model, tmp_path)
    raw = json.loads((tmp_path / "model.json").read_text())
    assert raw.pop("arch") == "transformer"
    (tmp_path / "model.json").write_text(json.dumps(raw))
    assert load_model(tmp_path).config == model.config


def test_load_errors_name_the_file(tmp_path, tiny_model):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope")
    save_model(tiny_model(VOCAB), tmp_path / "a")
    (tmp_path / "a" / "model.json").unlink()
    with pytest.raises(UserError, match="model.json"):
        load_model(tmp_path / "a")
    save_model(tiny_model(VOCAB), tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(tmp_path / "b")
    save_model(tiny_model(VOCAB), tmp_path / "c")
    config = json.loads((tmp_path / "c" / "model.json").read_text())
    (tmp_path / "c" / "model.json").write_text(json.dumps({**config, "d_model": 64}))
    with pytest.raises(UserError, match="model.safetensors.*shape"):
        load_model(tmp_path / "c")
    (tmp_path / "c" / "model.json").write_text(json.dumps({**config, "norm": "batchnorm"}))
    with pytest.raises(UserError, match="model.norm.*model.json"):
        model_config_from_json(tmp_path / "c" / "model.json")


def test_config_json_round_trip(tmp_path, tiny_model):
    cfg = tiny_model(VOCAB, preset="llama", n_kv_head=2).config
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert model_config_from_json(path) == cfg


def test_an_output_may_not_replace_an_input(tmp_path):
    source = tmp_path / "run" / "best"
    source.mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"x")
    for out in (source, tmp_path / "run", tmp_path):
        with pytest.raises(UserError, match="is the source|contains the source|lies inside the source"):
            check_output_dir(out, True, {"the source": source})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("x")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        check_output_dir(tmp_path / "out", False, {"the source": source})
    check_output_dir(tmp_path / "out", True, {"the source": source})


@pytest.mark.parametrize("name, content, fragment", [
    ("model.json", '{"n_layer": 0}', "model.n_layer: must be >= 1"),
    ("model.json", '{"d_model": 32, "n_head": 5}', "n_head=5 must divide"),
    ("model.json", "[1, 2]", "model.json: expected a JSON object"),
    ("tokenizer.json", "not json at all", "tokenizer.json: not a valid tokenizer.json"),
    ("checkpoint.json", "{torn", "checkpoint.json: not valid JSON"),
    ("config.yaml", "- a list\n", "config.yaml: top level must be a mapping"),
    ("config.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n", "the key 'lr' appears twice"),
])
def test_every_file_read_back_is_validated(tmp_path, tiny_model, char_tokenizer, write_run, cli, one_line_error,
                                           name, content, fragment):
    run = write_run(tmp_path / "run", tiny_model(char_tokenizer.get_vocab_size()), char_tokenizer)
    if name == "model.json" and content.startswith("{"):
        content = json.dumps({**json.loads((run / name).read_text()), **json.loads(content)})
    (run / name).write_text(content)
    text = tmp_path / "text.txt"
    text.write_text("ROMEO: speak.\n")
    command = {"config.yaml": ["eval", run], "checkpoint.json": ["eval", run, "--text-file", text]}.get(
        name, ["generate", run, "ROMEO:", "-n", "2"])
    one_line_error(cli(*command), name, fragment)
