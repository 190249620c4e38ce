"""Tests for llmcli/hf/export.py and `llmcli export` (with `llmcli import` where a test goes both ways).

Parity with `transformers` (a test-only dependency): logits to 1e-4 in float32, identical 32-token
greedy continuations, identical tokenizer ids.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from llmcli.checkpoint import load_model
from llmcli.errors import UserError
from llmcli.hf.export import export_hf
from llmcli.hf.importer import import_hf
from llmcli.options.checkpoints import ExportOptions, ImportOptions, QuantizeOptions
from llmcli.tokenizer import EOT

EXPORT_VARIANTS = [
    pytest.param("gpt2", {"d_ff": 80}, "GPT2LMHeadModel", id="gpt2-dff80"),
    pytest.param("gpt2", {"tie_embeddings": False, "dropout": 0.1}, "GPT2LMHeadModel", id="gpt2-untied"),
    pytest.param("llama", {"n_kv_head": 2, "d_ff": 96, "rope_theta": 500.0, "norm_eps": 1e-6},
                 "LlamaForCausalLM", id="llama-gqa-untied"),
    pytest.param("llama", {"n_kv_head": 2, "tie_embeddings": True}, "LlamaForCausalLM", id="llama-gqa-tied"),
]


@pytest.mark.parametrize("preset,extra,arch", EXPORT_VARIANTS)
def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(
        tmp_path, transformers, bpe_json, vocab, make_model, save_run, check_parity, preset, extra, arch):
    model = make_model(preset, **extra)
    run = save_run(tmp_path / "run", model, bpe_json)
    result = export_hf(ExportOptions(run_dir=run, out=tmp_path / "hf"))
    assert result.architecture == arch and result.eos_token_id == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == result.files == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    assert hf.config.vocab_size == vocab and hf.config.eos_token_id == 0 and hf.config.bos_token_id == 0
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    if preset == "gpt2":
        assert hf.config.n_inner == model.config.ff_dim and hf.config.n_positions == 64
    else:
        assert hf.config.num_key_value_heads == 2 and hf.config.intermediate_size == model.config.ff_dim
        assert hf.config.rope_parameters["rope_theta"] == model.config.rope_theta
    assert (hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()) == \
        model.config.tie_embeddings
    check_parity(model, hf, f"export {preset} {extra}")


def test_export_bfloat16_and_generation_config(tmp_path, transformers, bpe_json, make_model, save_run):
    model = make_model("llama", n_kv_head=2)
    export_hf(ExportOptions(run_dir=save_run(tmp_path / "run", model, bpe_json), out=tmp_path / "hf",
                            dtype="bfloat16"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == \
        {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(hf.model.embed_tokens.weight, model.tok_embed.weight.to(torch.bfloat16).float())


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_exported_tokenizer_gives_identical_ids(tmp_path, transformers, bpe_json, char_json, shakespeare,
                                                unicode_text, make_model, save_run, kind):
    path = bpe_json if kind == "bpe" else char_json
    export_hf(ExportOptions(run_dir=save_run(tmp_path / "run", make_model("gpt2"), path), out=tmp_path / "hf"))
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
    print(f"{kind}: {len(ours.encode(shakespeare).ids)} ids from {len(shakespeare)} characters; "
          f"{len(ours.encode(unicode_text).ids)} from {len(unicode_text)} unicode characters")
    if kind == "bpe":  # byte-level: everything round-trips
        assert theirs.decode(theirs(unicode_text)["input_ids"]) == unicode_text
        assert theirs.decode(theirs(sample)["input_ids"]) == sample


@pytest.mark.parametrize("preset,extra,fragments", [
    ("gpt2", {"pos": "rope"}, ["model.pos=rope cannot be exported as GPT-2",
                               "model.norm=layernorm, model.act=gelu, model.bias=true cannot be exported as Llama"]),
    ("gpt2", {"n_kv_head": 2}, ["model.n_kv_head=2 cannot be exported as GPT-2"]),
    ("llama", {"bias": True}, ["model.bias=true cannot be exported as Llama"]),
    ("llama", {"act": "gelu"}, ["model.act=gelu cannot be exported as Llama"]),
    ("gpt2", {"act": "relu"}, ["model.act=relu cannot be exported as GPT-2",
                               "with the overrides model.act=gelu (it then exports as GPT-2)"]),
    # the shakespeare-char recipe's extras: every one named at once, with the overrides that train an
    # exportable model
    ("llama", {"qk_norm": True, "value_embeds": 1, "logit_softcap": 15.0},
     [("transformers cannot run this model: model.qk_norm=true, model.logit_softcap=15.0, model.value_embeds=1: "
      "GPT-2 and Llama have no QK-norm, logit soft-capping or value-embedding tables; train an exportable model "
      "with the overrides model.qk_norm=false model.logit_softcap=null model.value_embeds=0 (it then exports as "
      "Llama)")]),
    ("llama", {"value_embeds": 1, "act": "gelu"},
     ["model.value_embeds=1: GPT-2 and Llama have no", "model.act=gelu cannot be exported as Llama",
      "with the overrides model.value_embeds=0 model.act=swiglu (it then exports as Llama)"]),
])
def test_export_refuses_configs_without_a_transformers_counterpart(tmp_path, bpe_json, make_model, save_run,
                                                                   preset, extra, fragments):
    run = save_run(tmp_path / "run", make_model(preset, **extra), bpe_json)
    with pytest.raises(UserError) as err:
        export_hf(ExportOptions(run_dir=run, out=tmp_path / "hf"))
    for fragment in fragments:
        assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written, no temp dirs


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_needs_dequantize(tmp_path, bpe_json, make_model, save_run, state_equal, method):
    from llmcli.quantize.command import quantize_checkpoint
    from llmcli.quantize.modules import dequantize_model

    run = save_run(tmp_path / "run", make_model("llama", n_kv_head=2, d_model=64), bpe_json)
    quantize_checkpoint(QuantizeOptions(run_dir=run, out=tmp_path / "q", method=method, eval_tokens=0,
                                        decode_tokens=0))
    with pytest.raises(UserError, match="quantized checkpoint.*--dequantize"):
        export_hf(ExportOptions(run_dir=tmp_path / "q", out=tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    export_hf(ExportOptions(run_dir=tmp_path / "q", out=tmp_path / "hf", dequantize=True))
    import_hf(ImportOptions(source=str(tmp_path / "hf"), out=tmp_path / "back"))
    state_equal(load_model(tmp_path / "back").state_dict(), dequantize_model(load_model(tmp_path / "q")).state_dict())


def test_existing_out_is_refused_and_overwrite_replaces(tmp_path, bpe_json, export_dir):
    model, hf = export_dir(tmp_path, bpe_json)
    run = tmp_path / "run"
    before = (hf / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        export_hf(ExportOptions(run_dir=run, out=hf))
    assert (hf / "model.safetensors").read_bytes() == before
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        import_hf(ImportOptions(source=str(hf), out=tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["keep.txt"]
    import_hf(ImportOptions(source=str(hf), out=tmp_path / "ckpt", overwrite=True))
    assert not (tmp_path / "ckpt" / "keep.txt").exists()
    export_hf(ExportOptions(run_dir=tmp_path / "ckpt", out=hf, overwrite=True))
    assert (hf / "model.safetensors").read_bytes() == before
    with pytest.raises(UserError, match="may not overlap an input"):
        export_hf(ExportOptions(run_dir=run, out=run, overwrite=True))
    with pytest.raises(UserError, match="may not overlap an input"):
        import_hf(ImportOptions(source=str(hf), out=hf, overwrite=True))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_cli_export_and_import(tmp_path, bpe_json, make_model, save_run, state_equal, edit_config, cli,
                               one_line_error):
    model = make_model("llama", n_kv_head=2)
    run = save_run(tmp_path / "run", model, bpe_json)
    out = cli("export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert out.exit_code == 0, out.output
    assert "exported LlamaForCausalLM (2 layers, d_model 32, 4 heads / 2 kv" in out.stdout
    assert f"-> {tmp_path / 'hf'}" in out.stdout and "AutoModelForCausalLM.from_pretrained" in out.stdout
    back = cli("import", tmp_path / "hf", "--out", tmp_path / "back")
    assert back.exit_code == 0, back.output
    assert "imported LlamaForCausalLM" in back.stdout and "as model.preset=llama" in back.stdout
    assert "end-of-text token: '<|endoftext|>' (id 0)" in back.stdout
    state_equal(load_model(tmp_path / "back").state_dict(), model.state_dict())

    one_line_error(cli("export", run, "--out", tmp_path / "hf"), "already exists", "--overwrite", alone=True)
    one_line_error(cli("import", tmp_path / "hf", "--out", tmp_path / "back"), "already exists", alone=True)
    one_line_error(cli("export", run, "--format", "onnx", "--out", tmp_path / "x"), "--format must be one of hf, gguf",
                   alone=True)
    one_line_error(cli("export", tmp_path / "nope", "--out", tmp_path / "x"), "checkpoint not found", alone=True)
    one_line_error(cli("export", run, "--out", tmp_path / "x", "--dtype", "int4"), "--dtype must be one of",
                   alone=True)
    bad = save_run(tmp_path / "bad", make_model("gpt2", pos="rope"), bpe_json)
    one_line_error(cli("export", bad, "--out", tmp_path / "x"), "model.pos=rope cannot be exported as GPT-2",
                   alone=True)
    edit_config(tmp_path / "hf", architectures=["BertModel"])
    one_line_error(cli("import", tmp_path / "hf", "--out", tmp_path / "y"), "BertModel is not supported", alone=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_export_refuses_a_recurrent_model(tmp_path, tiny_recurrent, char_tokenizer, write_run, cli, one_line_error):
    run = write_run(tmp_path / "lstm", tiny_recurrent("lstm", char_tokenizer.get_vocab_size()), char_tokenizer)
    one_line_error(cli("export", run, "--out", tmp_path / "hf"),
                   "holds a model.arch=lstm model: transformers has no lstm class to export it as", alone=True)
    assert not (tmp_path / "hf").exists()


def test_chat_template_travels_through_export_and_import(tmp_path, transformers, bpe_json, make_model, save_run):
    """export writes the checkpoint's template (or our default layout, as Jinja); transformers'
    apply_chat_template then gives our prompt; import keeps the template and generation_config."""
    from llmcli.chat_template import ChatTemplate, load_chat_template

    messages = [("system", "Be brief."), ("user", "Who art thou?")]
    chat = [{"role": r, "content": c} for r, c in messages]
    run = save_run(tmp_path / "run", make_model("llama"), bpe_json)
    export_hf(ExportOptions(run_dir=run, out=tmp_path / "hf"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == ChatTemplate().render(messages)

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    (run / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": EOT}))
    export_hf(ExportOptions(run_dir=run, out=tmp_path / "hf", overwrite=True))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_chat_template(None, run).render(messages)
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == ours
    assert ours == f"[system] Be brief.{EOT}\n[user] Who art thou?{EOT}\n"
    import_hf(ImportOptions(source=str(tmp_path / "hf"), out=tmp_path / "again"))
    assert load_chat_template(None, tmp_path / "again").render(messages) == ours
    assert (tmp_path / "again" / "generation_config.json").is_file()
