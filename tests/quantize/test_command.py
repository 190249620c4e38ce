"""`llmcli quantize`: the checkpoint it writes (bit-exact round trip), loading it with a dtype, int8
greedy decoding, eval/generate on its output, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llmcli.checkpoint import load_model, read_quantization
from llmcli.options.checkpoints import QuantizeOptions
from llmcli.quantize import modules as Q
from llmcli.quantize.command import quantize_checkpoint
from llmcli.quantize.kernels import fbgemm_available

FBGEMM = fbgemm_available()
TEXT = "".join(f"LINE {i}: the quick brown fox jumps over the lazy dog, and so on {i % 7}.\n" for i in range(600))


def quantize(run, out, method, group=None, embed=False):
    return quantize_checkpoint(QuantizeOptions(run_dir=run, out=out, method=method, group_size=group,
                                               include_embeddings=embed, eval_tokens=0, decode_tokens=0))


def stored_state(model):
    """What a checkpoint holds for `model`: its state dict without tied aliases."""
    return {k: v for k, v in model.state_dict().items() if k not in model.tied_weights()}


@pytest.fixture
def quantize_cli(cli):
    return lambda *args: cli("quantize", *args)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("method,group,embed", [("int8", None, False), ("int4", 32, False),
                                                ("int8", None, True), ("int4", 32, True)])
def test_quantized_checkpoint_round_trip_is_bit_exact(trained_runs, tmp_path, preset, method, group, embed):
    src = trained_runs[preset]
    out = tmp_path / "q"
    quantize(src, out, method, group, embed)
    for name in ("model.safetensors", "model.json", "tokenizer.json", "config.yaml", "checkpoint.json"):
        assert (out / name).is_file(), name
    entry = json.loads((out / "model.json").read_text())["quantization"]
    assert entry == {"method": method, "group_size": group, "include_embeddings": embed}
    assert json.loads((out / "checkpoint.json").read_text())["quantization"] == entry

    expected = Q.quantize_model(load_model(src).eval(), entry)
    stored = load_file(str(out / "model.safetensors"))
    assert stored.keys() == stored_state(expected).keys()
    assert all(torch.equal(stored[k], v) and stored[k].dtype == v.dtype for k, v in stored_state(expected).items())
    tied = preset == "gpt2"
    assert not any(k.startswith("lm_head") for k in stored) if tied else "lm_head.weight_scale" in stored
    assert ("tok_embed.weight_scale" in stored) == embed
    linear = "blocks.0.mlp.up_proj"
    assert stored[f"{linear}.weight"].dtype == (torch.int8 if method == "int8" else torch.uint8)

    loaded = load_model(out).eval()
    assert Q.quantization_of(loaded) == entry
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
    plain = Q.dequantize_model(load_model(out)).to(torch.bfloat16)
    assert next(plain.parameters()).dtype == torch.bfloat16
    dense = Q.dequantize_state_dict(stored, entry)
    assert not any(k.endswith("_scale") for k in dense)
    assert all(t.dtype == torch.float32 for t in dense.values() if t.is_floating_point())
    torch.testing.assert_close(dense[f"{linear}.weight"],
                               Q.dequantize_model(loaded).state_dict()[f"{linear}.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("preset,method,group", [("llama", "int8", None), ("gpt2", "int8", None), ("gpt2", "int4", 32)])
def test_load_with_a_dtype_keeps_the_stored_scales(trained_runs, tmp_path, preset, method, group):
    out = tmp_path / "q"
    quantize(trained_runs[preset], out, method, group, embed=True)
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
def test_int8_greedy_decoding_matches_float32(trained_runs, tmp_path, monkeypatch):
    """Greedy text from the int8 model equals the float32 model's for the first 24 tokens, and the
    teacher-forced logits differ by at most 0.05 (measured 0.026; they span about 5.5)."""
    from llmcli.generate.engine import Engine
    from llmcli.options.sampling import SamplingParams
    from llmcli.tokenizer import encode, load_tokenizer

    monkeypatch.setattr(Q, "FBGEMM_MIN_MODEL_WEIGHTS", 0)  # dynamic int8 activations in every layer
    out = tmp_path / "q"
    quantize(trained_runs["llama"], out, "int8")
    fp32, int8 = load_model(trained_runs["llama"]).eval(), load_model(out).eval()
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


@pytest.mark.parametrize("method,extra", [("int8", []), ("int4", ["--group-size", "32"])])
def test_cli_quantize_then_eval_and_generate(trained_runs, tmp_path, cli, quantize_cli, method, extra):
    out = tmp_path / method
    result = quantize_cli(trained_runs["llama"], "--method", method, *extra, "--out", out, "--eval-tokens", "600",
                          "--decode-tokens", "8")
    assert result.exit_code == 0, result.output
    for row in ("weights file", "val perplexity", "decode tok/s", "greedy tokens equal"):
        assert row in result.stdout, result.stdout
    assert (out / "model.safetensors").stat().st_size < 0.35 * (trained_runs["llama"] / "model.safetensors").stat().st_size

    result = cli("eval", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["perplexity"] < 30
    result = cli("generate", out, "LINE", "-n", "12", "--temperature", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["tokens"] == 12


@pytest.mark.parametrize("args,message", [
    (["--method", "int3"], "unknown quantization method 'int3'"),
    (["--method", "int4", "--group-size", "48"], "--group-size must be one of 32, 64, 128"),
    (["--method", "int4", "--group-size", "64"],
     "--group-size 64 does not divide blocks.0.attn.q_proj's in_features 32"),
    (["--method", "int8", "--group-size", "64"], "--group-size applies to int4 only"),
    (["--method", "int4"], ("--group-size 64 does not divide blocks.0.attn.q_proj's in_features 32 "
                            "(weight 32x32); use a group size that divides it (64 is the default)")),
    (["--method", "int8", "--eval-tokens", "-1"], "must be >= 0"),
])
def test_bad_options_are_one_line_errors(trained_runs, tmp_path, quantize_cli, one_line_error, args, message):
    out = tmp_path / "q"
    one_line_error(quantize_cli(trained_runs["gpt2"], *args, "--out", out), message)
    assert not out.exists()


def test_missing_data_says_how_to_skip_perplexity(trained_runs, tmp_path, quantize_cli, one_line_error):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["gpt2"], run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(trained_runs["gpt2"].parent / "corpus.txt"), str(tmp_path / "gone.txt")))
    result = quantize_cli(run, "--method", "int8", "--out", tmp_path / "q")
    one_line_error(result, "--eval-tokens 0 --decode-tokens 0 skip it")
    assert not (tmp_path / "q").exists()
    result = quantize_cli(run, "--method", "int8", "--out", tmp_path / "q", "--eval-tokens", "0")
    assert result.exit_code == 0, result.output
    assert "val perplexity" not in result.stdout and "decode tok/s" in result.stdout


def test_refuses_to_overwrite(trained_runs, tmp_path, quantize_cli, one_line_error):
    run = trained_runs["gpt2"]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    one_line_error(quantize_cli(run, "--method", "int8", "--out", run), "may not overlap an input")
    one_line_error(quantize_cli(run, "--method", "int8", "--out", run.parent), "may not overlap an input")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    out = tmp_path / "q"
    assert quantize_cli(run, "--method", "int8", "--out", out, "--eval-tokens", "0",
                        "--decode-tokens", "0").exit_code == 0
    saved = (out / "model.safetensors").read_bytes()
    one_line_error(quantize_cli(run, "--method", "int4", "-g", "32", "--out", out), "already exists")
    assert (out / "model.safetensors").read_bytes() == saved
    one_line_error(quantize_cli(out, "--method", "int4", "-g", "32", "--out", tmp_path / "q2"),
                          "is already quantized (int8)")
    assert not (tmp_path / "q2").exists()
    result = quantize_cli(run, "--method", "int4", "-g", "32", "--out", out, "--overwrite",
                          "--eval-tokens", "0", "--decode-tokens", "0")
    assert result.exit_code == 0, result.output
    assert read_quantization(out)["method"] == "int4"
