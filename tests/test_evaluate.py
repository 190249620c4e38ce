"""Scoring: the window plan, exact sums against a by-hand computation, and `llmcli eval`."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmcli.config import TokenizerConfig
from llmcli.config_loader import load_config
from llmcli.errors import UserError
from llmcli.evaluate import evaluate_checkpoint, metrics_from_sums, score_tokens, split_targets, window_plan
from llmcli.options.inference import EvalOptions
from llmcli.tokenizer import train_tokenizer

TEXT = "".join(f"Line {i}: to be, or not to be; that is the question {i % 5}. Ça va?\n" for i in range(120))


@pytest.fixture
def make_model(tiny_model):
    """A 1-layer model with large weights; `uniform` zeroes the head (every token equally likely)."""

    def make(vocab: int, block_size: int = 16, uniform: bool = False, seed: int = 0):
        model = tiny_model(vocab, preset=None, seed=seed, std=0.3, n_layer=1, n_head=2, d_model=16,
                           block_size=block_size, tie_embeddings=False)
        if uniform:
            with torch.no_grad():
                model.lm_head.weight.zero_()
        return model

    return make


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def make_checkpoint(tmp_path, corpus, make_model, write_run):
    def make(name: str, *, uniform: bool = False, seed: int = 0) -> Path:
        tok = train_tokenizer(TokenizerConfig(kind="char"), [TEXT])
        cfg = load_config(None, [f"data.source={corpus}", "data.val_fraction=0.2"])
        return write_run(tmp_path / name, make_model(tok.get_vocab_size(), uniform=uniform, seed=seed), tok, cfg,
                         {"step": 3})

    return make


# --- windows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,block,stride", [(2, 8, 4), (5, 8, 4), (9, 8, 4), (50, 8, 4), (50, 8, 1),
                                            (50, 8, 8), (51, 8, 3), (100, 16, 5)])
def test_window_plan_scores_every_token_once_with_enough_context(n, block, stride):
    plan = window_plan(n, block, stride)
    length = min(block, n - 1)
    scored = []
    for i, (start, skip) in enumerate(plan):
        assert 0 <= start and start + length <= n - 1 and 0 <= skip < length
        targets = [start + j + 1 for j in range(skip, length)]
        if i > 0:
            assert len(targets) <= stride
            assert min(t - start for t in targets) >= length - stride + 1  # context of each target
        scored += targets
    assert scored == list(range(1, n))


def test_window_plan_rejects_bad_strides():
    for stride in (0, 9):
        with pytest.raises(UserError, match="stride must be between 1 and the block size"):
            window_plan(100, 8, stride)


@pytest.mark.parametrize("stride,batch_size", [(8, 1), (3, 4), (1, 64)])
def test_score_tokens_matches_scoring_each_token_by_hand(make_model, stride, batch_size):
    model = make_model(20, block_size=8)
    tokens = torch.randint(0, 20, (40,), generator=torch.Generator().manual_seed(0))
    got = score_tokens(model, tokens.numpy().astype(np.uint16), stride=stride, batch_size=batch_size,
                       first_token=19)
    seq = torch.cat([torch.tensor([19]), tokens])
    nll, correct, correct5 = 0.0, 0, 0
    with torch.no_grad():
        for start, skip in window_plan(len(seq), 8, stride):
            for i in range(skip, 8):
                target = start + i + 1
                logits = model(seq[start:target][None])[0, -1]  # the window's context only
                nll -= torch.log_softmax(logits, -1)[seq[target]].item()
                correct += int(logits.argmax() == seq[target])
                correct5 += int(seq[target] in logits.topk(5).indices)
    assert got["tokens"] == 40
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert (got["correct"], got["correct_top5"]) == (correct, correct5)


def test_uniform_model_has_perplexity_equal_to_the_vocabulary(make_model):
    vocab = 37
    model = make_model(vocab, uniform=True)
    tokens = np.random.default_rng(0).integers(0, vocab, 200)
    metrics = metrics_from_sums(score_tokens(model, tokens, first_token=0), n_bytes=300)
    assert metrics["perplexity"] == pytest.approx(vocab, abs=1e-4)
    assert metrics["loss"] == pytest.approx(math.log(vocab), abs=1e-6)
    assert metrics["tokens"] == 200
    assert metrics["bits_per_byte"] == pytest.approx(math.log2(vocab) * 200 / 300, rel=1e-6)


def test_split_targets_separates_overrides():
    assert split_targets(["runs/a", "data.val_fraction=0.2", "runs/lr=3", "runs/b/best"]) == (
        ["runs/a", "runs/lr=3", "runs/b/best"], ["data.val_fraction=0.2"])


# --- checkpoints and the command ---------------------------------------------------------------


def test_evaluate_checkpoint_on_a_text_file_uniform(tmp_path, make_checkpoint):
    run = make_checkpoint("uniform", uniform=True)
    text = "to be, or not to be — Ça va?\n"  # '—' is unseen: scored as <unk>, with a warning
    path = tmp_path / "eval.txt"
    path.write_text(text, encoding="utf-8")
    result = evaluate_checkpoint(run, EvalOptions(targets=[str(run)], text_file=path), progress=False)
    vocab = train_tokenizer(TokenizerConfig(kind="char"), [TEXT]).get_vocab_size()
    m = result.metrics
    assert m["tokens"] == len(text)  # one token per character, the first one included
    assert m["perplexity"] == pytest.approx(vocab, abs=1e-4)
    assert m["bits_per_byte"] == pytest.approx(math.log2(vocab) * len(text) / len(text.encode()), rel=1e-6)
    assert result.step == 3


def test_cli_eval_json_on_the_checkpoints_own_val_split(make_checkpoint, cli):
    run = make_checkpoint("run", uniform=True)
    result = cli("eval", run, "--json", "--stride", "5", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    row = json.loads(line)
    assert set(row) == {"loss", "perplexity", "accuracy", "top5_accuracy", "bits_per_byte", "tokens",
                        "tokens_per_second", "checkpoint"}
    vocab = json.loads((run / "model.json").read_text())["vocab_size"]
    assert row["perplexity"] == pytest.approx(vocab, abs=1e-4) and row["checkpoint"] == str(run)
    # The val split: its text's characters plus one <|endoftext|> per document, all scored.
    from llmcli.data.prepare import prepare_data

    cfg = load_config(run / "config.yaml")
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(run / "tokenizer.json")))
    stats = prepare_data(cfg).stats["val"]
    assert row["tokens"] == stats["tokens"]
    assert row["bits_per_byte"] == pytest.approx(math.log2(vocab) * stats["tokens"] / stats["bytes"], rel=1e-6)


def test_cli_eval_compares_checkpoints_in_one_table(make_checkpoint, cli):
    a = make_checkpoint("alpha", seed=1)
    b = make_checkpoint("beta", uniform=True)
    result = cli("eval", a, b / ".", "data.val_fraction=0.3", "--stride", "16")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for needle in ("checkpoint", "bits/byte", "top-5", "alpha", "beta", "val split of"):
        assert needle in out


@pytest.mark.parametrize("args,message", [
    (["--split", "test"], "no 'test' split"),
    (["--stride", "0"], "--stride must be between 1 and the block size (16)"),
    (["--stride", "17"], "--stride must be between 1 and the block size (16)"),
    (["model.n_layer=3"], "only data.* settings apply to eval"),
    (["--text-file", "missing.txt"], "text file not found"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_cli_eval_errors_are_one_line(make_checkpoint, cli, one_line_error, args, message):
    one_line_error(cli("eval", make_checkpoint("run"), *args), message, alone=True)


def test_cli_eval_checkpoint_without_weights(tmp_path, cli, one_line_error):
    (tmp_path / "empty").mkdir()
    one_line_error(cli("eval", tmp_path / "empty"), "no model.safetensors")


# --- models that carry their state (recurrent) ---------------------------------------------------


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_carried_state_scores_like_one_forward_over_the_whole_text(tiny_recurrent, arch, batch_size):
    """Chunks of block_size * batch_size tokens, the state carried across: the sums of one forward
    over all 300 tokens (each predicted from its whole history, not a window)."""
    model = tiny_recurrent(arch, 20, std=0.4, block_size=16)
    tokens = torch.randint(0, 20, (300,), generator=torch.Generator().manual_seed(0))
    got = score_tokens(model, tokens.numpy().astype(np.uint16), batch_size=batch_size, first_token=19)
    seq = torch.cat([torch.tensor([19]), tokens])
    with torch.no_grad():
        logits = model(seq[None, :-1])[0]
    targets = seq[1:]
    assert got["tokens"] == 300
    assert got["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item(),
                                       rel=1e-5)
    assert got["correct"] == int((logits.argmax(-1) == targets).sum())
    assert got["correct_top5"] == int((logits.topk(5).indices == targets[:, None]).any(-1).sum())


@pytest.fixture
def recurrent_checkpoint(tmp_path, corpus, tiny_recurrent, write_run):
    tok = train_tokenizer(TokenizerConfig(kind="char"), [TEXT])
    cfg = load_config(None, [f"data.source={corpus}", "data.val_fraction=0.2"])
    return write_run(tmp_path / "lstm", tiny_recurrent("lstm", tok.get_vocab_size(), std=0.3), tok, cfg, {"step": 5})


def test_cli_eval_of_a_recurrent_model_and_percentages(recurrent_checkpoint, make_checkpoint, cli, one_line_error):
    result = cli("eval", recurrent_checkpoint, make_checkpoint("gpt"), "--percent")
    assert result.exit_code == 0, result.output
    assert "state carried through" in result.stderr and "chunk" in result.stderr
    rows = [line for line in result.stdout.splitlines() if "lstm" in line or "gpt" in line]
    assert len(rows) == 2 and all(line.count("%") == 2 for line in rows)
    json_row = json.loads(cli("eval", recurrent_checkpoint, "--json").stdout)
    assert 0 <= json_row["accuracy"] <= 1  # JSON keeps fractions
    one_line_error(cli("eval", recurrent_checkpoint, "--stride", "4"),
                   "--stride does not apply to", "model.arch=lstm model has no context window", alone=True)
