"""LoRA through peft: our target terms, a training step that moves only the adapter, merging, QLoRA-style
adapters over a quantized base, the adapter run on disk, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from llmcli import lora
from llmcli.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE, WEIGHTS, load_model
from llmcli.config import LoraConfig
from llmcli.errors import UserError
from llmcli.models.transformer import Transformer
from llmcli.quantize.modules import quantization_entry, quantize_model


def one_step(model: nn.Module, x: torch.Tensor) -> None:
    """One AdamW step on the next-token loss, over the parameters that train."""
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()


def test_targets_are_family_terms(tiny_model):
    gpt2, llama = tiny_model(40), tiny_model(40, preset="llama")
    assert set(gpt2.lora_targets()) == {"q", "k", "v", "o", "up", "down"}  # tied head: no embed/head
    assert set(llama.lora_targets()) == {"q", "k", "v", "o", "gate", "up", "down", "embed", "head"}
    assert lora.target_modules(llama, ["q", "head"]) == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj", "lm_head"]
    with pytest.raises(UserError, match="unknown target 'query'.*valid: q, k, v, o, up, down"):
        lora.target_modules(gpt2, ["query"])


def test_a_step_changes_only_the_adapter(tiny_model):
    model = lora.add_adapter(tiny_model(40, preset="llama").train(), LoraConfig(r=4, targets=["q", "v", "head"]))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    one_step(model, torch.randint(0, 40, (4, 17)))
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert changed == {name for name in trainable if "lora_A" in name or "lora_B" in name}


def test_merged_equals_base_plus_adapter(tiny_model):
    base = tiny_model(40, preset="llama")
    model = lora.add_adapter(tiny_model(40, preset="llama"), LoraConfig(r=4, alpha=8, targets=["q", "k", "down", "head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # B starts at zero: make the adapter do something
    x = torch.randint(0, 40, (3, 20))
    adapted = model(x)
    assert (adapted - base(x)).abs().max() > 1e-2
    merged = lora.merge(model)
    assert type(merged.blocks[0].attn.q_proj) is nn.Linear and not lora.is_adapted(merged)
    assert set(merged.state_dict()) == set(base.state_dict())
    assert (merged(x) - adapted).abs().max() <= 1e-5


def test_state_round_trip_through_peft(tiny_model):
    model = lora.add_adapter(tiny_model(40, preset="llama"), LoraConfig(r=2, targets=["v"]))
    state, config = lora.adapter_state(model), lora.peft_config_of(model)
    assert sorted(state) == [f"blocks.{i}.attn.v_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"]
    again = lora.load_adapter(tiny_model(40, preset="llama"), config, state, "test")
    x = torch.randint(0, 40, (2, 9))
    assert torch.equal(again(x), model.eval()(x))
    with pytest.raises(UserError, match="does not match its adapter config"):
        lora.load_adapter(tiny_model(40, preset="llama"), config, {"x.lora_A.weight": state[next(iter(state))]}, "bad")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_qlora_trains_over_a_frozen_quantized_base(tiny_model, method):
    model = quantize_model(tiny_model(40, preset="llama"), quantization_entry(method, 32 if method == "int4" else None))
    frozen = {name: t.clone() for name, t in model.state_dict().items()}
    lora.add_adapter(model.train(), LoraConfig(r=4, targets=["q", "v", "up"]))
    assert type(model.blocks[0].attn.q_proj.base_layer).__name__ == "QuantizedLinear"
    one_step(model, torch.randint(0, 40, (4, 17)))
    grads = [p.grad for name, p in model.named_parameters() if "blocks.0.attn.q_proj.lora_B" in name]
    assert grads[0].abs().sum() > 0  # the loss reached the first block back through the quantized layers
    for name, tensor in model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(tensor, frozen[name.replace(".base_layer", "")]), name


def test_unsupported_layer_type_is_named(tiny_model):
    class WithLSTM(Transformer):
        def lora_targets(self):
            return {**super().lora_targets(), "rnn": ["rnn"]}

    model = WithLSTM(tiny_model(40).config)
    model.rnn = nn.LSTM(8, 8)
    with pytest.raises(UserError, match=r"'rnn' is a LSTM layer \(rnn\), which peft's LoRA cannot adapt"):
        lora.add_adapter(model, LoraConfig(r=2, targets=["q", "rnn"]))


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_a_recurrent_family_adapts_its_linear_layers_and_names_the_recurrent_one(tiny_recurrent, arch):
    untied = dict(d_hidden=48, tie_embeddings=False)
    assert set(tiny_recurrent(arch).lora_targets()) == {arch}  # tied: no embed/head
    assert tiny_recurrent(arch, **untied).lora_targets() == {arch: ["rnn"], "embed": ["tok_embed"], "head": ["lm_head"]}
    model = lora.add_adapter(tiny_recurrent(arch, **untied).train(), LoraConfig(r=4, targets=["embed", "head"]))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    one_step(model, torch.randint(0, 50, (4, 17)))
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert changed and all(".lora_" in name for name in changed)
    layer = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[arch]
    with pytest.raises(UserError, match=rf"'{arch}' is a {layer} layer \(rnn\), which peft's LoRA cannot adapt"):
        lora.add_adapter(tiny_recurrent(arch, **untied), LoraConfig(r=2, targets=["head", arch]))


@pytest.mark.slow
def test_adapter_run_on_disk(lora_run, trained_runs):
    """The run saves the adapter alone (small), peft's config and a pointer to the base; loading it
    gives the base's weights plus the adapter's update."""
    assert not (lora_run / WEIGHTS).exists() and not (lora_run / "best" / WEIGHTS).exists()
    adapter = load_file(str(lora_run / ADAPTER_WEIGHTS))
    base_size = (trained_runs["llama"] / WEIGHTS).stat().st_size
    assert (lora_run / ADAPTER_WEIGHTS).stat().st_size < base_size / 5
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    config = json.loads((lora_run / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert json.loads((lora_run / BASE).read_text())["path"] == str(trained_runs["llama"].resolve())
    merged, base = load_model(lora_run), load_model(trained_runs["llama"])
    deltas = {k for k, t in merged.state_dict().items() if not torch.equal(t, base.state_dict()[k])}
    assert deltas and all(k.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight")) for k in deltas)


def test_cli_refusals(cli, one_line_error, trained_runs, alpaca_file, tmp_path):
    def train(*overrides):
        out = tmp_path / "out"
        result = cli("train", "--init-from", trained_runs["llama"], "--out", out, f"data.source={alpaca_file}",
                     "data.format=alpaca", *overrides)
        assert not (out / "config.yaml").exists()
        return result

    one_line_error(train("train.lora.r=4", "train.lora.targets=[q,query]"),
                   "unknown target 'query'", "valid: q, k, v, o, gate, up, down, embed, head")
    one_line_error(train("train.lora.r=0"), "train.lora.r: must be >= 1; got 0")
    one_line_error(train("train.lora.r=-2"), "train.lora.r: must be >= 1")
    one_line_error(train("train.lora.r=4", "train.lora.targets=[]"), "train.lora.targets: name at least one")
    one_line_error(cli("train", "-c", Path(__file__).parent.parent / "configs/tiny.yaml", "--out", tmp_path / "x", "train.lora.r=4"),
                   "train.lora needs --init-from RUN")
    lstm = tmp_path / "lstm"
    for targets, message in [("[lstm]", "'lstm' is a LSTM layer (rnn), which peft's LoRA cannot adapt"),
                             ("[q,v]", "unknown target 'q' for this lstm (valid: lstm)")]:
        one_line_error(cli("train", "--init-from", trained_runs["lstm"], "--out", lstm, f"data.source={alpaca_file}",
                           "data.format=alpaca", "train.lora.r=4", f"train.lora.targets={targets}"), message)
        assert not lstm.exists()


@pytest.mark.slow
def test_an_adapter_run_resumes(lora_run, cli, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    before = load_file(str(run / ADAPTER_WEIGHTS))
    result = cli("train", "--resume", run, "train.max_steps=36")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.stderr and "LoRA r=4" in result.stderr
    after = load_file(str(run / ADAPTER_WEIGHTS))
    assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in after)
    assert not (run / WEIGHTS).exists()


@pytest.mark.slow
def test_an_adapter_on_a_seq2seq_run(seq2seq_runs, pairs_file, tmp_path, cli):
    """LoRA on q, v (self- and cross-attention) and up of an encoder-decoder: only those weights move,
    the run loads merged, generates, and scores better on its val pairs than the base."""
    base, out = seq2seq_runs["encoder-decoder"], tmp_path / "lora"
    result = cli("train", "--init-from", base, "--out", out, "data.task=seq2seq", f"data.source={pairs_file}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1", "data.test_fraction=0.1",
                 "train.lora.r=4", "train.lora.targets=[q,v,up]",
                 "train.max_steps=30", "train.lr=1e-2", "train.warmup_steps=2", "train.eval_interval=30",
                 "train.eval_batches=2", "train.log_interval=30")
    assert result.exit_code == 0, result.output
    assert not (out / WEIGHTS).exists() and (out / ADAPTER_WEIGHTS).stat().st_size < (base / WEIGHTS).stat().st_size
    merged, original = load_model(out), load_model(base)
    deltas = {k for k, t in merged.state_dict().items() if not torch.equal(t, original.state_dict()[k])}
    assert any(".cross_attn.q_proj." in k for k in deltas) and any(k.startswith("encoder.") for k in deltas)
    assert deltas and all(k.endswith(("q_proj.weight", "v_proj.weight", "fc1.weight")) for k in deltas)
    generated = cli("generate", out, "abc", "-t", "0", "--json")
    assert generated.exit_code == 0, generated.output
    assert set(json.loads(generated.stdout)["target"].split()) <= set("ABCDEFGH")
    scores = [cli("eval", run, "--json") for run in (base, out)]
    assert all(s.exit_code == 0 for s in scores), scores[1].output
    before, after = (json.loads(s.stdout.strip().splitlines()[-1]) for s in scores)
    assert after["perplexity"] < before["perplexity"]
