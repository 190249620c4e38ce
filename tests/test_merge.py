"""`llmcli merge`, and an adapter run read directly by eval and generate like any checkpoint (serve: tests/serve)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from llmcli.checkpoint import ADAPTER_WEIGHTS, WEIGHTS, load_model
from llmcli.config_loader import load_config
from llmcli.lora import load_adapter


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    from typer.testing import CliRunner

    from llmcli.cli import app

    out = tmp_path_factory.mktemp("merged") / "ckpt"
    result = CliRunner().invoke(app, ["merge", str(lora_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_merged_checkpoint_equals_base_plus_adapter(lora_run, merged, trained_runs):
    assert (merged / WEIGHTS).is_file() and not (merged / ADAPTER_WEIGHTS).exists()
    unmerged = load_adapter(load_model(trained_runs["llama"]), LoraConfig.from_pretrained(str(lora_run)),
                            load_file(str(lora_run / ADAPTER_WEIGHTS)), "test")
    plain = load_model(merged).eval()
    x = torch.randint(0, plain.config.vocab_size, (3, 32))
    with torch.no_grad():
        assert (plain(x) - unmerged(x)).abs().max() <= 1e-5
    assert load_config(merged / "config.yaml").train.lora.r is None


@pytest.mark.slow
def test_adapter_run_in_eval_and_generate(cli, lora_run, merged):
    scored = [json.loads(cli("eval", path, "--json").stdout) for path in (lora_run, merged)]
    assert scored[0]["loss"] == pytest.approx(scored[1]["loss"], abs=1e-5) and scored[0]["tokens"] > 0
    outputs = [cli("generate", path, "user: say fox\nassistant:", "-n", "12", "--temperature", "0").stdout
               for path in (lora_run, merged)]
    assert outputs[0] == outputs[1] and len(outputs[0]) > len("user: say fox\nassistant:")


def test_merge_refusals(cli, one_line_error, trained_runs, tmp_path):
    one_line_error(cli("merge", trained_runs["llama"], "--out", tmp_path / "m"), "holds no LoRA adapter")
