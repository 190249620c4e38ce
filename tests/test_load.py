"""The one load entry point: what every command runs a checkpoint with."""

from __future__ import annotations

from llmcli.insight.inspect_run import inspect_run
from llmcli.load import load_checkpoint
from llmcli.options.checkpoints import QuantizeOptions
from llmcli.quantize.command import quantize_checkpoint


def test_an_int8_checkpoint_counts_the_parameters_of_its_float_model(trained_runs, tmp_path):
    """serve's banner and inspect count alike: int8 weights are buffers and the runner repacks the
    model for decoding, yet the count is the float model's."""
    out = tmp_path / "int8"
    quantize_checkpoint(QuantizeOptions(run_dir=trained_runs["llama"], out=out, method="int8",
                                        eval_tokens=0, decode_tokens=0))
    float_model = load_checkpoint(trained_runs["llama"])
    quantized = load_checkpoint(out)
    assert float_model.parameters == float_model.model.num_params()
    assert quantized.parameters == float_model.parameters
    assert sum(p.numel() for p in quantized.model.parameters()) < quantized.parameters  # what the banner showed
    assert inspect_run(out)["parameters"]["total"] == quantized.parameters
