"""`llmcli generate`: output shapes, streaming, prompts from files and stdin, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmcli.options.sampling import SamplingParams


@pytest.fixture
def checkpoint(tmp_path, make_model, char_tokenizer, write_run) -> Path:
    return write_run(tmp_path / "run", make_model(char_tokenizer.get_vocab_size(), block_size=32), char_tokenizer)


@pytest.fixture
def invoke(cli):
    return lambda *args, input=None: cli("generate", *args, input=input)


def test_cli_json_output_shape(checkpoint, invoke):
    result = invoke(checkpoint, "ROMEO:", "-n", "12", "--num-samples", "3", "--seed", "1", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"prompt", "completion", "tokens", "prefill_tokens_per_second",
                            "decode_tokens_per_second"}
        assert row["prompt"] == "ROMEO:" and 1 <= row["tokens"] <= 12 and row["decode_tokens_per_second"] >= 0
    again = invoke(checkpoint, "ROMEO:", "-n", "12", "--num-samples", "3", "--seed", "1", "--json")
    assert [json.loads(line)["completion"] for line in again.stdout.splitlines()] == [r["completion"] for r in rows]


def test_cli_text_output_and_stdin_lines(checkpoint, invoke):
    result = invoke(checkpoint, "--lines", "-n", "8", "--temperature", "0", "--ignore-eot",
                    input="All:\n\nSpeak\n")
    assert result.exit_code == 0, result.output
    parts = result.stdout.split("---\n")
    assert len(parts) == 2 and parts[0].startswith("All:") and parts[1].startswith("Speak")
    streamed = invoke(checkpoint, "All:", "-n", "8", "--temperature", "0", "--ignore-eot")
    whole = invoke(checkpoint, "All:", "-n", "8", "--temperature", "0", "--ignore-eot", "--no-stream")
    assert streamed.stdout == whole.stdout == parts[0]


def test_cli_empty_prompt_starts_a_document(checkpoint, invoke):
    result = invoke(checkpoint, "", "-n", "5", "--seed", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == ""


def test_cli_long_prompt_is_truncated_with_a_warning(checkpoint, invoke):
    result = invoke(checkpoint, "Speak, speak. " * 10, "-n", "40", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert "longer than the context window (32 tokens)" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1]"),
    (["--min-p", "-0.1"], "--min-p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--stop", ""], "stop string cannot be empty"),
])
def test_cli_bad_options_are_one_line_errors(checkpoint, invoke, one_line_error, args, message):
    one_line_error(invoke(checkpoint, "ROMEO:", *args), message, alone=True)


def test_cli_bad_inputs_are_one_line_errors(checkpoint, invoke, one_line_error, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    (tmp_path / "noweights").mkdir()
    cases = [
        ([checkpoint, "--prompt-file", empty], "is empty"),
        ([checkpoint, "--prompt-file", blank, "--lines"], "is empty"),
        ([checkpoint, "--prompt-file", tmp_path / "missing.txt"], "not found"),
        ([checkpoint, "ROMEO", "--prompt-file", empty], "not both"),
        ([tmp_path / "noweights", "ROMEO"], "no model.safetensors"),
        ([tmp_path / "nothing", "ROMEO"], "checkpoint not found"),
        ([checkpoint, "Zebra 42"], "never saw: '2' '4' 'Z'"),
    ]
    for args, message in cases:
        one_line_error(invoke(*args, input=""), message, alone=True)
    one_line_error(invoke(checkpoint, input=""), "stdin is empty")


def test_eos_from_generation_config_stops_generation(tmp_path, make_model, llama_tokenizer, write_run, cli,
                                                     run_engine):
    """A Llama-style tokenizer (no <|endoftext|>): generation stops at generation_config.json's
    eos_token_id, at any of the ids of a list, and goes on past it with --ignore-eot."""
    model = make_model(llama_tokenizer.get_vocab_size(), block_size=64)
    run = write_run(tmp_path / "run", model, llama_tokenizer)
    prompt = llama_tokenizer.encode("Speak", add_special_tokens=False).ids
    (ids,), _ = run_engine(model, [prompt], [SamplingParams(max_new_tokens=24, temperature=0)], batch_size=1)
    stop_at = next(i for i, t in enumerate(ids) if i >= 3 and t not in ids[:i])  # a token's first appearance
    free = json.loads(cli("generate", run, "Speak", "-n", "24", "--temperature", "0", "--json").stdout)
    assert free["tokens"] == 24  # no end token known: only the length limit
    (run / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, ids[stop_at]]}))
    stopped = json.loads(cli("generate", run, "Speak", "-n", "24", "--temperature", "0", "--json").stdout)
    assert stopped["tokens"] == stop_at + 1
    assert stopped["completion"] == llama_tokenizer.decode(ids[:stop_at], skip_special_tokens=False)
    past = json.loads(cli("generate", run, "Speak", "-n", "24", "--temperature", "0", "--json", "--ignore-eot").stdout)
    assert past["tokens"] == 24 and past["completion"] == free["completion"]
