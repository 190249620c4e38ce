"""serve --engine vllm: the folder handed to vLLM (what its loaders read) and the command line built;
vLLM itself is not needed (nor installed here)."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmcli.options.inference import ServeOptions
from llmcli.serve.vllm import STAMP, VLLM_SERVER, export_dir, exported_folder, vllm_command


@pytest.fixture
def run(tmp_path, tiny_model, char_tokenizer, write_run) -> Path:
    model = tiny_model(char_tokenizer.get_vocab_size(), preset="llama", block_size=32)
    return write_run(tmp_path / "runs" / "llama", model, char_tokenizer)


def test_the_exported_folder_is_what_vllm_loads(run):
    transformers = pytest.importorskip("transformers")
    folder = exported_folder(run)
    assert folder == export_dir(run) == run.parent / ".llama.vllm" and folder.is_dir()
    config = transformers.AutoConfig.from_pretrained(folder)  # vLLM reads the architecture from here
    assert config.architectures == ["LlamaForCausalLM"] and config.max_position_embeddings == 32
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer("ROMEO: speak")["input_ids"]) == "ROMEO: speak"
    assert tokenizer.chat_template  # vLLM's /v1/chat/completions renders with it
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    from llmcli.checkpoint import load_model

    ids = torch.tensor([tokenizer("ROMEO:")["input_ids"]])
    torch.testing.assert_close(hf(ids).logits, load_model(run)(ids), rtol=1e-4, atol=1e-4)


def test_the_folder_is_reused_until_the_checkpoint_changes(run):
    folder = exported_folder(run)
    weights = folder / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert exported_folder(run) == folder and weights.stat().st_mtime_ns == first  # reused
    time.sleep(0.01)
    os.utime(run / "model.safetensors")  # a new checkpoint in the same place
    exported_folder(run)
    assert weights.stat().st_mtime_ns != first
    assert json.loads((folder / STAMP).read_text())["source"] == str(run.resolve())


def test_the_command_line_carries_serve_options_and_extra_arguments(tmp_path):
    opts = ServeOptions(run_dir=Path("runs/llama/best"), engine="vllm", host="0.0.0.0", port=9000, max_batch_size=32,
                        dtype="bfloat16", vllm_args=["--tensor-parallel-size", "2", "--enable-prefix-caching"])
    argv = vllm_command(tmp_path / "hf", opts, "llama/best", python="python3")
    assert argv == ["python3", "-m", VLLM_SERVER, "--model", str(tmp_path / "hf"),
                    "--served-model-name", "llama/best", "--host", "0.0.0.0", "--port", "9000",
                    "--max-num-seqs", "32", "--dtype", "bfloat16", "--tensor-parallel-size", "2",
                    "--enable-prefix-caching"]
    named = vllm_command(tmp_path / "hf", ServeOptions(run_dir=Path("x"), engine="vllm", api_key="secret"), "mine")
    assert named[named.index("--served-model-name") + 1] == "mine" and "secret" not in " ".join(named)
    assert "--dtype" not in named  # auto: vLLM's own choice


def test_cli_without_vllm_is_one_line_naming_the_package(run, cli, one_line_error):
    pytest.importorskip("openai")  # keeps this with the other serve tests
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    one_line_error(cli("serve", run, "--engine", "vllm", "--", "--tensor-parallel-size", "2"),
                   "--engine vllm needs the vllm package", "pip install vllm", alone=True)
    assert not export_dir(run).exists()


def test_cli_refusals(tmp_path, run, tiny_model, tiny_recurrent, char_tokenizer, write_run, cli, one_line_error):
    one_line_error(cli("serve", run, "--", "--tensor-parallel-size", "2"), "only go to --engine vllm", alone=True)
    one_line_error(cli("serve", run, "--engine", "tgi"), "--engine must be llmcli or vllm", alone=True)
    one_line_error(cli("serve", run, "--engine", "vllm", "--threads", "2"), "drop --device/--threads", alone=True)
    layout = tmp_path / "layout.json"
    layout.write_text("{}")
    one_line_error(cli("serve", run, "--engine", "vllm", "--chat-template", layout), "must be a .jinja", alone=True)
    lstm = write_run(tmp_path / "lstm", tiny_recurrent("lstm", char_tokenizer.get_vocab_size()), char_tokenizer)
    one_line_error(cli("serve", lstm, "--engine", "vllm"), "transformers has no lstm class to export it as",
                   alone=True)
    assert not export_dir(lstm).exists()
    extras = write_run(tmp_path / "qk", tiny_model(char_tokenizer.get_vocab_size(), preset="llama", qk_norm=True,
                                                   value_embeds=1), char_tokenizer)
    one_line_error(cli("serve", extras, "--engine", "vllm"), "vLLM cannot run this model: model.qk_norm=true, "
                   "model.value_embeds=1", "with the overrides model.qk_norm=false model.value_embeds=0", alone=True)
    assert not export_dir(extras).exists()
