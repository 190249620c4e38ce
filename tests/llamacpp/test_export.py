"""Tests for llmcli/llamacpp/ and `llmcli export --format gguf` that need only the `gguf` package: each
file read back with gguf's reader holds exactly the tensors written, in llama.cpp's names and layouts
(spelled out here, independently of the code under test), with its metadata; quantized checkpoints
keep their integers; adapters add up to the merged model; refusals are one line and write nothing.
The same files in the real llama.cpp: test_llama_cpp.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmcli.checkpoint import load_model, write_checkpoint
from llmcli.config import Config
from llmcli.models.registry import FAMILIES
from llmcli.tokenizer import EOT, load_tokenizer

gguf = pytest.importorskip("gguf")


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """(metadata by key, {tensor name: (type name, data)}) as gguf's reader sees the file."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return fields, {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


def rope_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k permutation: per head, rotate-half pairs (i, i + d/2) become adjacent."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def expected_tensors(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors for our state dict, by hand: its names, [out, in] matrices, fused GPT-2 qkv,
    permuted Llama q/k (works on any tensors with rows along dim 0: weights, int8 values, scales)."""
    out = {"token_embd.weight": state["tok_embed.weight"], "output_norm.weight": state["final_norm.weight"]}
    if not config.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        if config.preset == "gpt2":
            for suffix in ("weight", "bias"):
                names = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_output": "attn.out_proj",
                         "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
                out.update({f"{g}{theirs}.{suffix}": state.get(f"{b}{ours}.{suffix}") for theirs, ours in names.items()})
                if f"{b}attn.q_proj.{suffix}" in state:
                    out[f"{g}attn_qkv.{suffix}"] = torch.cat([state[f"{b}attn.{p}_proj.{suffix}"] for p in "qkv"])
        else:
            out.update({f"{g}attn_norm.weight": state.get(f"{b}attn_norm.weight"),
                        f"{g}attn_q.weight": rope_order(state[f"{b}attn.q_proj.weight"], config.n_head),
                        f"{g}attn_k.weight": rope_order(state[f"{b}attn.k_proj.weight"], config.kv_heads),
                        f"{g}attn_v.weight": state[f"{b}attn.v_proj.weight"],
                        f"{g}attn_output.weight": state[f"{b}attn.out_proj.weight"],
                        f"{g}ffn_norm.weight": state.get(f"{b}mlp_norm.weight"),
                        f"{g}ffn_gate.weight": state[f"{b}mlp.gate_proj.weight"],
                        f"{g}ffn_up.weight": state[f"{b}mlp.up_proj.weight"],
                        f"{g}ffn_down.weight": state[f"{b}mlp.down_proj.weight"]})
    if config.preset == "gpt2":
        out.update({"position_embd.weight": state["pos_embed.weight"], "output_norm.bias": state["final_norm.bias"]})
    return {k: v for k, v in out.items() if v is not None}


VARIANTS = [
    pytest.param("gpt2", {}, id="gpt2-tied"),
    pytest.param("gpt2", {"tie_embeddings": False, "d_ff": 96}, id="gpt2-untied-dff96"),
    pytest.param("llama", {}, id="llama-untied"),
    pytest.param("llama", {"n_kv_head": 2, "tie_embeddings": True, "rope_theta": 500.0, "norm_eps": 1e-6},
                 id="llama-gqa-tied"),
]


@pytest.mark.parametrize("preset,extra", VARIANTS)
def test_read_back_holds_exactly_the_tensors_written(tmp_path, make_run, export, tokenizer_files, preset, extra):
    run = make_run(preset, **extra)
    meta, tensors = read_gguf(export(run, tmp_path / "model.gguf"))
    model = load_model(run)
    c = model.config
    expected = expected_tensors(model.state_dict(), c)
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        qtype, data = tensors[name]
        assert qtype == "F32" and data.shape == tuple(want.shape), name
        assert np.array_equal(data, want.numpy()), name
    arch = "gpt2" if preset == "gpt2" else "llama"
    assert meta["general.architecture"] == arch and meta["general.type"] == "model"
    assert meta["general.name"] == run.name and meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert (meta[f"{arch}.context_length"], meta[f"{arch}.embedding_length"], meta[f"{arch}.block_count"],
            meta[f"{arch}.feed_forward_length"], meta[f"{arch}.attention.head_count"],
            meta[f"{arch}.attention.head_count_kv"]) == (128, 64, 2, c.ff_dim, 4, c.kv_heads)
    if arch == "llama":
        assert meta["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
        assert meta["llama.rope.dimension_count"] == 16 and meta["llama.vocab_size"] == c.vocab_size
        assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    else:
        assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(c.norm_eps)
    vocab = load_tokenizer(tokenizer_files["bpe"]).get_vocab()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.token_type"] == [3] + [1] * (len(vocab) - 1)  # <|endoftext|> is a control token
    spec = json.loads(tokenizer_files["bpe"].read_text())
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.bos_token_id"]) == (0, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")


@pytest.mark.parametrize("dtype,qtype", [("float16", "F16"), ("bfloat16", "BF16"), ("q8_0", "Q8_0"),
                                         ("q4_0", "Q4_0"), ("q4_1", "Q4_1")])
def test_float_checkpoint_in_each_type(tmp_path, make_run, export, dtype, qtype):
    run = make_run("gpt2")
    _, tensors = read_gguf(export(run, tmp_path / "m.gguf", dtype=dtype))
    expected = expected_tensors(load_model(run).state_dict(), load_model(run).config)
    for name, want in expected.items():
        kind, data = tensors[name]
        if want.dim() == 1 or name.startswith("position_embd"):  # llama.cpp keeps these float32
            assert kind == "F32" and np.array_equal(data, want.numpy()), name
            continue
        assert kind == qtype, name
        values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(want.shape)
        step = {"F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 127, "Q4_0": 1 / 7, "Q4_1": 1 / 15}[qtype]
        assert np.abs(values - want.numpy()).max() <= step * np.abs(want.numpy()).max(), name


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_int8_checkpoint_becomes_q8_0_with_its_own_integers(tmp_path, make_run, export, preset):
    from llmcli.options.checkpoints import QuantizeOptions
    from llmcli.quantize.command import quantize_checkpoint

    run = make_run(preset, n_kv_head=2 if preset == "llama" else None)
    quantize_checkpoint(QuantizeOptions(run_dir=run, out=tmp_path / "q", method="int8", include_embeddings=True,
                                        eval_tokens=0, decode_tokens=0))
    meta, tensors = read_gguf(export(tmp_path / "q", tmp_path / "q.gguf"))
    state = load_model(tmp_path / "q").state_dict()
    config = load_model(tmp_path / "q").config
    values = {k: v for k, v in state.items() if not k.endswith("_scale")}
    ints = expected_tensors(values, config)
    scales = expected_tensors({k: state.get(k + "_scale", v) for k, v in values.items()}, config)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    quantized = [name for name, want in ints.items() if want.dtype == torch.int8]
    assert {name for name, (kind, _) in tensors.items() if kind == "Q8_0"} == set(quantized)
    assert len(quantized) == (16 if preset == "llama" else 9)  # every matrix, the embedding included
    for name in quantized:
        kind, data = tensors[name]
        rows, cols = ints[name].shape
        blocks = data.reshape(rows, cols // 32, 34)
        assert kind == "Q8_0"
        assert np.array_equal(blocks[:, :, 2:].copy().view(np.int8).reshape(rows, cols), ints[name].numpy())
        d = blocks[:, :, :2].copy().view(np.float16).reshape(rows, cols // 32)
        assert np.array_equal(d, np.repeat(scales[name].half().numpy()[:, None], cols // 32, axis=1))
    for name, want in ints.items():  # norms and biases stay float32 as they were
        if name not in quantized:
            assert tensors[name][0] == "F32" and np.array_equal(tensors[name][1], want.numpy()), name


def test_int4_checkpoint_becomes_q4_1_and_other_types_dequantize(tmp_path, make_run, export):
    from llmcli.options.checkpoints import QuantizeOptions
    from llmcli.quantize.command import quantize_checkpoint
    from llmcli.quantize.modules import dequantize_model

    run = make_run("llama", n_kv_head=2)
    quantize_checkpoint(QuantizeOptions(run_dir=run, out=tmp_path / "q", method="int4", group_size=32,
                                        eval_tokens=0, decode_tokens=0))
    dense = dequantize_model(load_model(tmp_path / "q"))
    expected = expected_tensors(dense.state_dict(), dense.config)
    meta, tensors = read_gguf(export(tmp_path / "q", tmp_path / "q.gguf"))
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    zero_scale = 2 * max(v.abs().max().item() for v in expected.values())  # |zero * scale| <= 2 max|w|
    for name, want in expected.items():
        kind, data = tensors[name]
        if name.startswith("token_embd") or want.dim() == 1:  # embeddings were not quantized
            assert kind == "F32" and np.array_equal(data, want.numpy()), name
            continue
        assert kind == "Q4_1", name
        values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1).reshape(want.shape)
        # the same 4-bit values and float16 scales; only the block minimum -zero * scale rounds to float16
        assert np.abs(values - want.numpy()).max() <= zero_scale * 2**-11, name
    result = _export_cli(tmp_path / "q", tmp_path / "q4_0.gguf", "--dtype", "q4_0")
    assert result.exit_code == 0 and "note: 15 int4 matrices dequantized to Q4_0" in result.stdout
    assert read_gguf(tmp_path / "q4_0.gguf")[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    result = _export_cli(tmp_path / "q", tmp_path / "f32.gguf", "--dequantize")
    assert result.exit_code == 0 and "ALL_F32" in result.stdout
    for name, want in expected.items():
        assert np.array_equal(read_gguf(tmp_path / "f32.gguf")[1][name][1], want.numpy()), name


def _export_cli(run: Path, out: Path, *args: str):
    from typer.testing import CliRunner

    from llmcli.cli import app

    return CliRunner().invoke(app, ["export", str(run), "--format", "gguf", "--out", str(out), *map(str, args)])


def llama_cpp_bpe(text: str, merges: list[str], tokens: list[str]) -> list[int]:
    """llama.cpp's gpt2 tokenizer on text free of special tokens, for a vocabulary whose merges never
    cross characters (a char vocabulary): byte-level characters, then merges by rank, then lookup."""
    from llmcli.llamacpp.vocab import byte_level

    rank = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = list(byte_level(text))
    while True:
        ranked = [(rank[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False)) if pair in rank]
        if not ranked:
            return [ids[s] for s in symbols if s in ids]
        _, i = min(ranked)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]


def test_char_vocabulary_as_byte_level_bpe(tmp_path, make_run, export, tokenizer_files, corpus):
    from llmcli.llamacpp.vocab import byte_level

    meta, _ = read_gguf(export(make_run("llama", "char"), tmp_path / "c.gguf"))
    tok = load_tokenizer(tokenizer_files["char"])
    vocab = tok.get_vocab()
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(vocab) and tokens[:2] == [EOT, "<unk>"]
    assert meta["tokenizer.ggml.token_type"] == [3] + [1] * (len(vocab) - 1)
    assert meta["tokenizer.ggml.unknown_token_id"] == 1
    assert tokens[vocab["é"]] == byte_level("é") == "Ã©" and tokens[vocab["\n"]] == "Ċ"
    for merge in meta["tokenizer.ggml.merges"]:  # a character's bytes so far, and its next byte
        left, right = merge.split(" ", 1)
        assert len(right) == 1 and any(t.startswith(left + right) and t != left for t in tokens), merge
    for text in corpus.split(EOT):
        assert llama_cpp_bpe(text, meta["tokenizer.ggml.merges"], tokens) == tok.encode(text).ids


def test_ascii_char_vocabulary_gets_a_merge_that_never_applies(tmp_path, tiny_model, char_tokenizer, write_run,
                                                               export):
    run = write_run(tmp_path / "run", tiny_model(char_tokenizer.get_vocab_size(), preset="llama"), char_tokenizer)
    meta, _ = read_gguf(export(run, tmp_path / "c.gguf"))
    assert meta["tokenizer.ggml.merges"] == ["À À"]  # 0xC0 0xC0: in no UTF-8 text


def test_vocabulary_padded_to_the_model(tmp_path, tiny_model, perturb, tokenizer_files, export):
    model = tiny_model(320, preset="gpt2")
    write_checkpoint(tmp_path / "run", model, Config(model=model.config), tokenizer_files["bpe"].read_bytes(), {})
    meta, tensors = read_gguf(export(tmp_path / "run", tmp_path / "m.gguf"))
    assert meta["tokenizer.ggml.tokens"][300:] == [f"[PAD{i}]" for i in range(300, 320)]
    assert meta["tokenizer.ggml.token_type"][300:] == [5] * 20 and tensors["token_embd.weight"][1].shape == (320, 32)


def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(tmp_path, make_run, tokenizer_files, cli, one_line_error):
    one_line_error(cli("export", make_run("gpt2", "word"), "--format", "gguf", "--out", tmp_path / "w.gguf"),
                   "a word tokenizer cannot be written for llama.cpp", "tokenizer.kind=bpe or char", alone=True)
    run = make_run("gpt2", "bpe", name="prefix")
    spec = json.loads((run / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (run / "tokenizer.json").write_text(json.dumps(spec))
    one_line_error(cli("export", run, "--format", "gguf", "--out", tmp_path / "p.gguf"),
                   "not GPT-2's byte-level make", "add_prefix_space", "convert_hf_to_gguf.py", alone=True)
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (run / "tokenizer.json").write_text(json.dumps(spec))
    one_line_error(cli("export", run, "--format", "gguf", "--out", tmp_path / "p.gguf"), "Metaspace", alone=True)
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("arch", [a for a in FAMILIES if FAMILIES[a].gguf_refusal])
def test_families_llama_cpp_cannot_run_are_refused_naming_what_runs_them(
        tmp_path, arch, tiny_recurrent, tiny_seq2seq, char_tokenizer, write_run, cli, one_line_error):
    from tests.conftest import SEQ2SEQ_ARCHES

    model = tiny_seq2seq(arch) if arch in SEQ2SEQ_ARCHES else tiny_recurrent(arch)
    run = write_run(tmp_path / "run", model, char_tokenizer)
    line = one_line_error(cli("export", run, "--format", "gguf", "--out", tmp_path / "m.gguf"),
                          f"model.arch={arch}", FAMILIES[arch].gguf_refusal, alone=True)
    assert "llmcli" in line and not (tmp_path / "m.gguf").exists()
    assert ("--format hf" in line) == (arch == "encoder-decoder")


def test_only_the_transformer_family_runs_in_llama_cpp():
    assert [arch for arch, family in FAMILIES.items() if family.gguf_refusal is None] == ["transformer"]


@pytest.mark.parametrize("extra,fragment", [
    ({"act": "relu"}, "model.act=relu cannot be exported as GPT-2"),
    ({"layer_ff": [64, 32]}, ("llama.cpp cannot run this model: a pruned model (per-layer model.layer_heads / "
                              "model.layer_ff): GPT-2 and Llama give every layer the same heads and MLP width; "
                              "export the model it was pruned from (it exports as GPT-2)")),
    ({"qk_norm": True, "value_embeds": 1, "logit_softcap": 15.0},
     ("llama.cpp cannot run this model: model.qk_norm=true, model.logit_softcap=15.0, model.value_embeds=1: GPT-2 "
      "and Llama have no QK-norm, logit soft-capping or value-embedding tables; train an exportable model with the "
      "overrides model.qk_norm=false model.logit_softcap=null model.value_embeds=0 (it then exports as GPT-2)")),
])
def test_transformers_without_a_llama_cpp_architecture_are_refused(tmp_path, make_run, cli, one_line_error,
                                                                    extra, fragment):
    run = make_run("gpt2", **extra)
    one_line_error(cli("export", run, "--format", "gguf", "--out", tmp_path / "m.gguf", "--ollama"),
                   fragment, alone=True)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "Modelfile").exists()


def test_output_rules(tmp_path, make_run, cli, one_line_error):
    run = make_run("llama")
    out = tmp_path / "m.gguf"
    first = cli("export", run, "--format", "gguf", "--out", out)
    assert first.exit_code == 0, first.output
    before = out.read_bytes()
    one_line_error(cli("export", run, "--format", "gguf", "--out", out), "already exists; pass --overwrite")
    (tmp_path / "d").mkdir()
    one_line_error(cli("export", run, "--format", "gguf", "--out", tmp_path / "d"), "is a directory")
    one_line_error(cli("export", run, "--format", "gguf", "--out", run / "m.gguf"), "lies inside the source")
    one_line_error(cli("export", run, "--out", tmp_path / "hf", "--ollama"), "--ollama is for --format gguf")
    one_line_error(cli("export", run, "--out", tmp_path / "hf", "--dtype", "q8_0"),
                   "--dtype must be one of auto, float32, bfloat16, float16 for --format hf")
    one_line_error(cli("export", run, "--format", "gguf", "--out", out, "--dtype", "q2_k"), "q8_0, q4_0, q4_1")
    one_line_error(cli("export", run, "--format", "gguf", "--out", tmp_path / "a.gguf", "--adapter-only"),
                   "holds no LoRA adapter", "train.lora.r")
    one_line_error(cli("export", run, "--format", "gguf", "--out", tmp_path / "a.gguf", "--adapter-only",
                       "--ollama"), "--ollama needs a model")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["d", "llama-bpe", "m.gguf"]
    (tmp_path / "Modelfile").write_text("mine")
    one_line_error(cli("export", run, "--format", "gguf", "--out", tmp_path / "n.gguf", "--ollama"),
                   "the Modelfile", "already exists")
    assert (tmp_path / "Modelfile").read_text() == "mine" and not (tmp_path / "n.gguf").exists()
    assert cli("export", run, "--format", "gguf", "--out", tmp_path / "n.gguf", "--ollama", "--overwrite").exit_code == 0
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./n.gguf\n")


def test_cli_output_and_default_modelfile(tmp_path, make_run, cli):
    run = make_run("gpt2", "char")
    result = cli("export", run, "--format", "gguf", "--out", tmp_path / "out" / "demo.gguf", "--ollama")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("exported llama.cpp gpt2 (2 layers, d_model 64, 4 heads") and "ALL_F32" in lines[0]
    assert lines[1].startswith("tokenizer: characters as byte-level BPE") and lines[1].endswith("ends at <|endoftext|>")
    assert lines[2] == f"run it: llama-cli -m {tmp_path / 'out' / 'demo.gguf'}"
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile == (
        "FROM ./demo.gguf\n"
        'TEMPLATE """{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant:"""\n'
        "PARAMETER num_ctx 128\nPARAMETER temperature 0.8\nPARAMETER top_k 0\nPARAMETER top_p 1.0\n"
        "PARAMETER min_p 0.0\nPARAMETER repeat_penalty 1.0\nPARAMETER stop <|endoftext|>\n"
        'PARAMETER stop "\nuser:"\n')


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
FOLDED = ("{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
          "{% elif message['role'] == 'assistant' %}{{ message['content'] }}</s>{% endif %}{% endfor %}")


@pytest.mark.parametrize("template,expected", [
    (CHATML, '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'),
    (FOLDED, None),
])
def test_modelfile_translates_a_per_message_jinja_template(tmp_path, make_run, export, template, expected):
    run = make_run("llama")
    (run / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": EOT}))
    export(run, tmp_path / "m.gguf", ollama=True)
    meta, _ = read_gguf(tmp_path / "m.gguf")
    assert meta["tokenizer.chat_template"] == template
    modelfile = (tmp_path / "Modelfile").read_text()
    if expected is None:
        assert "\nTEMPLATE" not in modelfile and "\n# no TEMPLATE: this chat template is not a per-message" in modelfile
    else:
        assert expected in modelfile and modelfile.count("<|im_start|>assistant\n") == 2  # its turn, and the prompt
    assert modelfile.endswith("PARAMETER stop <|endoftext|>\n")  # a Jinja template adds no stop strings


@pytest.mark.parametrize("preset,targets", [("llama", ["q", "k", "v", "o", "gate", "up", "down", "embed", "head"]),
                                            ("gpt2", ["q", "v", "o", "up"])])
def test_adapter_only_adds_up_to_the_merged_model(tmp_path, lora_checkpoint, export, preset, targets):
    base, adapter = lora_checkpoint(preset, targets)
    _, plain = read_gguf(export(base, tmp_path / "base.gguf"))
    _, merged = read_gguf(export(adapter, tmp_path / "merged.gguf"))  # a LoRA run exports merged by default
    meta, lora = read_gguf(export(adapter, tmp_path / "adapter.gguf", adapter_only=True))
    assert (meta["general.type"], meta["adapter.type"], meta["adapter.lora.alpha"]) == ("adapter", "lora", 0.0)
    assert meta["general.architecture"] == ("llama" if preset == "llama" else "gpt2")
    assert "tokenizer.ggml.tokens" not in meta
    adapted = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert sorted(lora) == sorted(f"{n}{s}" for n in adapted for s in (".lora_a", ".lora_b"))
    # llama: 7 matrices per layer, the embedding and the head; gpt2: attn_qkv (q and v), attn_output, ffn_up
    assert len(adapted) == (16 if preset == "llama" else 6)
    for name, (_, weight) in plain.items():
        if name not in adapted:
            assert np.array_equal(weight, merged[name][1]), name
            continue
        a, b = lora[name + ".lora_a"][1], lora[name + ".lora_b"][1]
        delta = a @ b.T if name == "token_embd.weight" else b @ a
        assert np.abs(weight + delta - merged[name][1]).max() <= 1e-5, name
