"""Tests for llmcli/quantize.py and `llmcli quantize`: error bounds, packing, the checkpoint
format, the runtime kernels, eval/generate on quantized checkpoints, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmcli import quantize as Q
from llmcli.cli import app
from llmcli.config import PRESETS, ModelConfig, load_config
from llmcli.model import Transformer, load_model
from llmcli.train import train

runner = CliRunner()
TEXT = "".join(f"LINE {i}: the quick brown fox jumps over the lazy dog, and so on {i % 7}.\n" for i in range(600))
FBGEMM = Q._fbgemm_available()


def make_model(preset: str = "gpt2", seed: int = 0, **overrides) -> Transformer:
    fields = dict(PRESETS[preset], preset=preset, n_layer=2, n_head=2, d_model=64, vocab_size=50, block_size=32)
    fields.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**fields)).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two briefly trained tiny runs: GPT-2 style (tied, biases) and Llama style (untied, SwiGLU)."""
    root = tmp_path_factory.mktemp("quantize-runs")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    out = {}
    for preset in ("gpt2", "llama"):
        cfg = load_config(None, [f"data.source={corpus}", f"data.cache_dir={root / 'cache'}",
                                 f"model.preset={preset}", "model.n_layer=2", "model.n_head=2",
                                 "model.d_model=32", "model.block_size=32", "train.batch_size=8",
                                 "train.max_steps=60", "train.warmup_steps=5", "train.lr=3e-3",
                                 "train.eval_interval=60", "train.eval_batches=2", "train.log_interval=60"])
        train(cfg, root / preset)
        out[preset] = root / preset
    return out


def quantize_cli(*args: str):
    return runner.invoke(app, ["quantize", *map(str, args)])


# --- quantize / dequantize / pack ------------------------------------------------------------


def test_int8_rounding_error_is_at_most_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(40, 96) * torch.logspace(-4, 1, 40)[:, None]  # rows of very different sizes
    w[3] = 0.0
    q, scale = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (40,)
    assert int(q.abs().max()) == 127 and torch.equal(q[3], torch.zeros(96, dtype=torch.int8))
    error = (w - Q.dequantize_int8(q, scale)).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("group", Q.GROUP_SIZES)
def test_int4_rounding_error_is_at_most_half_a_step_per_group(group):
    torch.manual_seed(1)
    w = torch.randn(24, 256) * torch.logspace(-3, 0, 24)[:, None]
    w[0, :group] = 0.0  # an all-zero group
    w[1, :group] = -torch.rand(group)  # only negative values: zero point 15
    w[2, :group] = torch.rand(group)  # only positive values: zero point 0
    w[3, 1::7] = 0.0  # zeros inside a group stay exactly zero
    packed, scale, zero = Q.quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128)
    assert scale.dtype == torch.float16 and scale.shape == (24, 256 // group)
    assert zero.dtype == torch.uint8 and zero.shape == (24, 256 // group // 2)
    q, zero = Q.unpack_int4(packed), Q.unpack_int4(zero)
    assert int(q.min()) == 0 and int(q.max()) == 15
    assert int(zero[1, 0]) == 15 and int(zero[2, 0]) == 0
    dequantized = Q.dequantize_int4(packed, scale, Q.pack_int4(zero), group)
    step = scale.float().repeat_interleave(group, dim=1)
    assert bool(((w - dequantized).abs() <= step / 2 * (1 + 1e-5)).all())
    assert bool((dequantized[w == 0] == 0).all())


def test_int4_with_an_odd_number_of_groups():
    torch.manual_seed(3)
    w = torch.randn(5, 96)  # 3 groups of 32 per row: the zero points are padded to 2 bytes
    packed, scale, zero = Q.quantize_int4(w, 32)
    assert scale.shape == (5, 3) and zero.shape == (5, 2)
    step = scale.float().repeat_interleave(32, dim=1)
    assert bool(((w - Q.dequantize_int4(packed, scale, zero, 32)).abs() <= step / 2 * (1 + 1e-5)).all())


def test_int4_pack_unpack_is_exact():
    signed = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(signed, signed)  # every value in both nibbles, odd and negative too
    packed = Q.pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert len(set(packed.flatten().tolist())) == 256  # all byte values, so nothing collides
    assert torch.equal(Q.unpack_int4(packed, signed=True), pairs)
    unsigned = torch.cartesian_prod(torch.arange(16), torch.arange(16)).to(torch.int8)
    assert torch.equal(Q.unpack_int4(Q.pack_int4(unsigned), signed=False), unsigned)
    odd = torch.tensor([[1, -3, 5, 7, -7, 3]], dtype=torch.int8)
    assert Q.pack_int4(odd).tolist() == [[0xD1, 0x75, 0x39]]  # low nibble = even column
    with pytest.raises(ValueError, match="even"):
        Q.pack_int4(torch.zeros(2, 5, dtype=torch.int8))


# --- runtime -----------------------------------------------------------------------------------


@pytest.mark.skipif(not FBGEMM, reason="no fbgemm quantized engine in this torch build")
def test_dynamic_int8_rows_are_batch_independent_and_match_fbgemm(monkeypatch):
    """fbgemm (one call per row) and the float32 emulation of it (many rows) agree, so a token's
    output does not depend on the batch it is in."""
    torch.manual_seed(2)
    linear = nn.Linear(96, 80)
    layer = Q.QuantizedLinear.from_linear(linear, "int8", None, dynamic_activations=True)
    assert layer.dynamic_activations
    x = torch.randn(50, 96) * torch.logspace(-2, 1, 50)[:, None]
    x[7] = 0.0
    with torch.no_grad():
        alone = torch.cat([layer(row[None]) for row in x])  # fbgemm, one token per call
        few = layer(x[:Q.ROW_LOOP_MAX_TOKENS])  # fbgemm row by row
        many = layer(x)  # more than ROW_LOOP_MAX_TOKENS rows: float32 emulation
        reference = linear(x)
    assert torch.equal(few, alone[:Q.ROW_LOOP_MAX_TOKENS])
    scale = reference.abs().amax(dim=1, keepdim=True)
    assert float(((many - alone).abs() / scale).max()) <= 1e-4
    # Activation (7-bit per token) + weight (8-bit per channel) rounding: about 1% of the output.
    assert float(((alone - reference).abs() / scale).max()) <= 0.05
    torch.testing.assert_close(alone[7], linear.bias.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("method,group,tolerance", [("int8", None, 0.02), ("int4", 32, 0.15)])
def test_quantized_model_logits_stay_close(preset, method, group, tolerance, monkeypatch):
    monkeypatch.setattr(Q, "FBGEMM_MIN_MODEL_WEIGHTS", 0)  # the dynamic-activation path where available
    model = make_model(preset)
    idx = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        reference = model(idx)
        Q.quantize_model(model, Q.quantization_entry(method, group))
        logits = model(idx)
    assert sum(isinstance(m, Q.QuantizedLinear) for m in model.modules()) == (2 * 7 + 1 if preset == "llama" else 2 * 6)
    error = (logits - reference).abs().max() / reference.abs().max()
    assert float(error) <= tolerance, float(error)


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32)])
def test_accelerator_path_computes_the_dequantized_matmul(method, group):
    """The CUDA path cannot run here (no GPU); its arithmetic, forced on the CPU, must match."""
    torch.manual_seed(4)
    layer = Q.QuantizedLinear.from_linear(nn.Linear(64, 48), method, group)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
        torch.testing.assert_close(layer._matmul_accelerator(x), expected, rtol=1e-5, atol=1e-5)


def test_dequantized_model_computes_what_the_weight_only_path_computes():
    model = make_model("llama")
    Q.quantize_model(model, Q.quantization_entry("int4", 32, include_embeddings=True))
    plain = Q.dequantize_model(model)
    assert not any(isinstance(m, Q.QuantizedWeight) for m in plain.modules())
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), model(idx), rtol=0, atol=1e-5)


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("method,group,embed", [("int8", None, False), ("int4", 32, False),
                                                ("int8", None, True), ("int4", 32, True)])
def test_quantized_checkpoint_round_trip_is_bit_exact(runs, tmp_path, preset, method, group, embed):
    src = runs[preset]
    out = tmp_path / "q"
    Q.quantize_checkpoint(src, out, method=method, group_size=group, include_embeddings=embed,
                          eval_tokens=0, decode_tokens=0)
    for name in ("model.safetensors", "model.json", "tokenizer.json", "config.yaml", "checkpoint.json"):
        assert (out / name).is_file(), name
    entry = json.loads((out / "model.json").read_text())["quantization"]
    assert entry == {"method": method, "group_size": group, "include_embeddings": embed}
    assert json.loads((out / "checkpoint.json").read_text())["quantization"] == entry

    expected = Q.quantize_model(load_model(src).eval(), entry)
    stored = load_file(str(out / "model.safetensors"))
    assert stored.keys() == Q.quantized_state_dict(expected).keys()
    assert all(torch.equal(stored[k], v) and stored[k].dtype == v.dtype
               for k, v in Q.quantized_state_dict(expected).items())
    tied = preset == "gpt2"
    assert not any(k.startswith("lm_head") for k in stored) if tied else "lm_head.weight_scale" in stored
    assert ("tok_embed.weight_scale" in stored) == embed
    linear = "blocks.0.mlp.up_proj"
    assert stored[f"{linear}.weight"].dtype == (torch.int8 if method == "int8" else torch.uint8)

    loaded = load_model(out).eval()
    assert loaded.quantization == entry
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    idx = torch.randint(0, loaded.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), expected(idx))
    if tied and embed:
        assert isinstance(loaded.lm_head, Q.TiedQuantizedHead)
    elif tied:
        assert loaded.lm_head.weight is loaded.tok_embed.weight  # the float embedding, still tied

    # Export's path: the same weights as floats, in a plain Transformer.
    plain = Q.load_dequantized_model(out, dtype=torch.bfloat16)
    assert next(plain.parameters()).dtype == torch.bfloat16
    dense = Q.dequantize_state_dict(stored, entry)
    assert not any(k.endswith("_scale") for k in dense)
    assert all(t.dtype == torch.float32 for t in dense.values() if t.is_floating_point())
    torch.testing.assert_close(dense[f"{linear}.weight"],
                               Q.dequantize_model(loaded).state_dict()[f"{linear}.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("preset,method,group", [("llama", "int8", None), ("gpt2", "int8", None), ("gpt2", "int4", 32)])
def test_load_with_a_dtype_keeps_the_stored_scales(runs, tmp_path, preset, method, group):
    out = tmp_path / "q"
    Q.quantize_checkpoint(runs[preset], out, method=method, group_size=group, include_embeddings=True,
                          eval_tokens=0, decode_tokens=0)
    model = load_model(out, dtype=torch.bfloat16)
    layer = model.blocks[0].attn.q_proj
    assert layer.weight.dtype == (torch.int8 if method == "int8" else torch.uint8)
    assert layer.weight_scale.dtype == (torch.float32 if method == "int8" else torch.float16)
    assert model.blocks[0].attn_norm.weight.dtype == torch.bfloat16
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert model.tok_embed(idx).dtype == torch.bfloat16  # like the float table it replaced
    with torch.no_grad():
        logits = model(idx)
        reference = load_model(out)(idx)
    assert logits.dtype == torch.float32
    assert float((logits - reference).abs().max()) < 0.1 * float(reference.abs().max())


@pytest.mark.skipif(not FBGEMM, reason="no fbgemm quantized engine in this torch build")
def test_int8_greedy_decoding_matches_float32(runs, tmp_path, monkeypatch):
    """Greedy text from the int8 model equals the float32 model's for the first 24 tokens, and the
    teacher-forced logits differ by at most 0.05 (measured 0.026; they span about 5.5)."""
    from llmcli.generate import Engine, SamplingParams
    from llmcli.tokenizer import encode, load_tokenizer

    monkeypatch.setattr(Q, "FBGEMM_MIN_MODEL_WEIGHTS", 0)  # dynamic int8 activations in every layer
    out = tmp_path / "q"
    Q.quantize_checkpoint(runs["llama"], out, method="int8", eval_tokens=0, decode_tokens=0)
    fp32, int8 = load_model(runs["llama"]).eval(), load_model(out).eval()
    assert all(m.dynamic_activations for m in int8.modules() if isinstance(m, Q.QuantizedLinear))

    def greedy(model):
        engine = Engine(model, max_batch_size=1)
        engine.add([0, 5, 6], SamplingParams(max_new_tokens=24, temperature=0, ignore_eot=True))
        tokens = []
        while engine.has_work():
            tokens += [ev.token for ev in engine.step()]
        return tokens

    assert greedy(int8) == greedy(fp32)
    idx = torch.tensor([encode(load_tokenizer(out / "tokenizer.json"), TEXT[:32])])
    with torch.no_grad():
        reference, logits = fp32(idx), int8(idx)
    assert float(reference.max() - reference.min()) > 3  # about 5.5: the 0.05 bound is not vacuous
    assert float((logits - reference).abs().max()) <= 0.05


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method,extra", [("int8", []), ("int4", ["--group-size", "32"])])
def test_cli_quantize_then_eval_and_generate(runs, tmp_path, method, extra):
    out = tmp_path / method
    result = quantize_cli(runs["llama"], "--method", method, *extra, "--out", out, "--eval-tokens", "600",
                          "--decode-tokens", "8")
    assert result.exit_code == 0, result.output
    for row in ("weights file", "val perplexity", "decode tok/s", "greedy tokens equal"):
        assert row in result.stdout, result.stdout
    assert (out / "model.safetensors").stat().st_size < 0.35 * (runs["llama"] / "model.safetensors").stat().st_size

    result = runner.invoke(app, ["eval", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["perplexity"] < 30
    result = runner.invoke(app, ["generate", str(out), "LINE", "-n", "12", "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["tokens"] == 12


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr  # (progress lines may come first)


@pytest.mark.parametrize("args,message", [
    (["--method", "int3"], "unknown quantization method 'int3'"),
    (["--method", "int4", "--group-size", "48"], "--group-size must be one of 32, 64, 128"),
    (["--method", "int4", "--group-size", "64"],
     "--group-size 64 does not divide blocks.0.attn.q_proj's in_features 32"),
    (["--method", "int8", "--group-size", "64"], "--group-size applies to int4 only"),
    (["--method", "int4"], "--group-size 64 does not divide blocks.0.attn.q_proj's in_features 32 "
                           "(weight 32x32); use a group size that divides it (64 is the default)"),
    (["--method", "int8", "--eval-tokens", "-1"], "must be >= 0"),
])
def test_bad_options_are_one_line_errors(runs, tmp_path, args, message):
    out = tmp_path / "q"
    assert_one_line_error(quantize_cli(runs["gpt2"], *args, "--out", out), message)
    assert not out.exists()


def test_missing_data_says_how_to_skip_perplexity(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["gpt2"], run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(runs["gpt2"].parent / "corpus.txt"), str(tmp_path / "gone.txt")))
    result = quantize_cli(run, "--method", "int8", "--out", tmp_path / "q")
    assert_one_line_error(result, "--eval-tokens 0 skips it")
    assert not (tmp_path / "q").exists()
    result = quantize_cli(run, "--method", "int8", "--out", tmp_path / "q", "--eval-tokens", "0")
    assert result.exit_code == 0, result.output
    assert "val perplexity" not in result.stdout and "decode tok/s" in result.stdout


def test_refuses_to_overwrite(runs, tmp_path):
    run = runs["gpt2"]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert_one_line_error(quantize_cli(run, "--method", "int8", "--out", run), "would overwrite")
    assert_one_line_error(quantize_cli(run, "--method", "int8", "--out", run.parent), "would overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    out = tmp_path / "q"
    assert quantize_cli(run, "--method", "int8", "--out", out, "--eval-tokens", "0",
                        "--decode-tokens", "0").exit_code == 0
    saved = (out / "model.safetensors").read_bytes()
    assert_one_line_error(quantize_cli(run, "--method", "int4", "-g", "32", "--out", out), "already exists")
    assert (out / "model.safetensors").read_bytes() == saved
    assert_one_line_error(quantize_cli(out, "--method", "int4", "-g", "32", "--out", tmp_path / "q2"),
                          "is already quantized (int8)")
    assert not (tmp_path / "q2").exists()
    result = quantize_cli(run, "--method", "int4", "-g", "32", "--out", out, "--overwrite",
                          "--eval-tokens", "0", "--decode-tokens", "0")
    assert result.exit_code == 0, result.output
    assert Q.read_quantization(out / "model.json")["method"] == "int4"
