"""`llmcli data prepare` and `llmcli tokenizer train` from the command line."""

import pytest


def test_prepare_happy_path_and_reuse(sample_txt, cli):
    result = cli("data", "prepare", f"data.source={sample_txt}")
    assert result.exit_code == 0, result.output
    for word in ("split", "documents", "characters", "tokens", "chars/token", "train", "val",
                 "tokenizer: char", "dtype uint16", "built in"):
        assert word in result.stdout
    assert result.stderr == ""
    again = cli("data", "prepare", f"data.source={sample_txt}")
    assert again.exit_code == 0 and "(reused)" in again.stdout
    forced = cli("data", "prepare", "--force", f"data.source={sample_txt}")
    assert forced.exit_code == 0 and "built in" in forced.stdout


def test_tokenizer_train_and_overwrite(sample_txt, tmp_path, cli, one_line_error):
    out = tmp_path / "tok.json"
    args = ("tokenizer", "train", "--out", out, f"data.source={sample_txt}", "tokenizer.kind=bpe",
            "tokenizer.vocab_size=300")
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert f"bpe tokenizer, vocab size 300 -> {out}" in first.stdout
    one_line_error(cli(*args), str(out), "already exists", "--overwrite")
    assert cli(*args, "--overwrite").exit_code == 0


@pytest.mark.parametrize("name, write, args, fragments", [
    ("missing", None, [], ["does not exist"]),
    ("empty", b"", [], ["is empty"]),
    ("latin1", b"caf\xe9\n", [], ["not valid UTF-8 at byte 3", "encoding_errors=replace"]),
    ("ok", b"some text\n" * 50, ["data.nosuchkey=1"], ["unknown key 'data.nosuchkey'"]),
    ("ok", b"some text\n" * 50, ["data.num_proc=many"], ["data.num_proc: must be an integer"]),
    ("ok", b"some text\n" * 50, ["tokenizer.kind=bpe", "tokenizer.vocab_size=100"],
     ["tokenizer.vocab_size=100", "minimum is 257"]),
    ("ok", b"some text\n" * 50, ["tokenizer.path=/no/such/tokenizer.json"],
     ["tokenizer file not found", "/no/such/tokenizer.json"]),
])
def test_prepare_errors_are_one_line(tmp_path, name, write, args, fragments, cli, one_line_error):
    path = tmp_path / f"{name}.txt"
    if write is not None:
        path.write_bytes(write)
    result = cli("data", "prepare", f"data.source={path}", *args)
    one_line_error(result, *fragments)
    if name != "ok":
        assert f"{name}.txt" in result.stderr


def test_unknown_play_and_bad_yaml(tmp_path, cli, one_line_error):
    one_line_error(cli("data", "prepare", "data.val_plays=[hamlet,nosuchplay]"),
                          "unknown play 'nosuchplay'", "valid names:", "hamlet", "twelfth-night")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    one_line_error(cli("data", "prepare", "-c", bad), "bad.yaml", "not valid YAML")
    one_line_error(cli("tokenizer", "train", "--out", tmp_path / "t.json", "-c", bad), "bad.yaml")
