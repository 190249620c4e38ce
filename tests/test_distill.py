"""`llmcli distill`: the loss against a hand computation, alpha=0 is plain training, both terms in
metrics.jsonl, exact --resume, two processes, and refusals (tokenizer, task, teacher) that write
nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmcli.config_loader import load_config
from llmcli.distill import distillation_loss
from llmcli.train.loop import train
from llmcli.train.run_dir import RunPlan

TEXT = "".join(f"LINE {i}: the quick brown fox jumps over the lazy dog, and so on {i % 7}.\n" for i in range(600))


def student(corpus: Path, *extra: str) -> list[str]:
    return [f"data.source={corpus}", "model.arch=gru", "model.n_layer=1", "model.d_model=24", "model.block_size=32",
            "train.batch_size=4", "train.max_steps=6", "train.warmup_steps=1", "train.eval_interval=3",
            "train.eval_batches=1", "train.log_interval=1", "train.lr=1e-2", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


@pytest.fixture
def corpus(trained_runs) -> Path:
    return trained_runs["llama"].parent / "corpus.txt"  # the teachers' own training text


def test_the_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100  # padding carries neither term
    T, alpha = 2.0, 0.3
    real = [(b, i) for b in range(2) for i in range(5) if labels[b, i] != -100]
    kl = 0.0
    ce = 0.0
    for b, i in real:
        p = torch.softmax(t[b, i] / T, -1)
        q = torch.softmax(s[b, i] / T, -1)
        kl += float((p * (p.log() - q.log())).sum())
        ce += -float(torch.log_softmax(s[b, i], -1)[labels[b, i]])
    kd_hand, ce_hand = kl / len(real) * T * T, ce / len(real)
    loss, kd, ce_term = distillation_loss(s, t, labels, T, alpha)
    assert kd.item() == pytest.approx(kd_hand, rel=1e-5) and ce_term.item() == pytest.approx(ce_hand, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * kd_hand + (1 - alpha) * ce_hand, rel=1e-5)
    same, kd_same, _ = distillation_loss(s, s, labels, T, 1.0)
    assert kd_same.item() == pytest.approx(0.0, abs=1e-6) and same.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(distillation_loss(s, t, labels, T, 0.0)[0],
                       torch.nn.functional.cross_entropy(s.flatten(0, 1), labels.flatten(), ignore_index=-100))


def test_alpha_zero_is_plain_training(trained_runs, corpus, tmp_path, cli):
    result = cli("distill", "--teacher", trained_runs["llama"], "--out", tmp_path / "kd", *student(corpus, "distill.alpha=0"))
    assert result.exit_code == 0, result.output
    train(RunPlan(load_config(None, student(corpus, f"tokenizer.path={trained_runs['llama'] / 'tokenizer.json'}")),
                  tmp_path / "plain"))
    a, b = weights(tmp_path / "kd"), weights(tmp_path / "plain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in metrics(tmp_path / "kd") if "train_loss" in r]
    assert all(r["train_loss"] == pytest.approx(r["train_ce"]) and r["train_kd"] > 0 for r in rows)
    saved = load_config(tmp_path / "kd" / "config.yaml")
    assert saved.distill.alpha == 0 and saved.distill.teacher == str(trained_runs["llama"].resolve())
    assert "distill" not in load_config(tmp_path / "plain" / "config.yaml").to_dict()


def test_distilling_lowers_the_kl_and_logs_both_terms(trained_runs, corpus, tmp_path, cli):
    result = cli("distill", "--teacher", trained_runs["gpt2"], "--out", tmp_path / "kd",
                 *student(corpus, "train.max_steps=12", "distill.alpha=0.7", "distill.temperature=2"))
    assert result.exit_code == 0, result.output
    rows = [r for r in metrics(tmp_path / "kd") if "train_loss" in r]
    assert all(r["train_loss"] == pytest.approx(0.7 * r["train_kd"] + 0.3 * r["train_ce"]) for r in rows)
    assert rows[-1]["train_kd"] < rows[0]["train_kd"]
    assert "kd " in result.output and "ce " in result.output  # the live progress shows both


def test_resume_is_bit_identical_to_one_run(trained_runs, corpus, tmp_path, cli):
    args = ["--teacher", trained_runs["llama"], *student(corpus, "model.dropout=0.1", "train.lr_decay_steps=6")]
    assert cli("distill", "--out", tmp_path / "straight", *args).exit_code == 0
    assert cli("distill", "--out", tmp_path / "resumed", *args, "train.max_steps=3").exit_code == 0
    result = cli("distill", "--resume", tmp_path / "resumed", "train.max_steps=6")
    assert result.exit_code == 0, result.output
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    volatile = ("elapsed", "tokens_per_second")
    assert [{k: v for k, v in r.items() if k not in volatile} for r in straight] == \
        [{k: v for k, v in r.items() if k not in volatile} for r in resumed]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_distill(trained_runs, corpus, tmp_path, torchrun):
    proc = torchrun("distill", "--teacher", trained_runs["llama"], "--out", tmp_path / "kd",
                    *student(corpus, "train.max_steps=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    rows = [r for r in metrics(tmp_path / "kd") if "train_kd" in r]
    assert len(rows) == 3 and all(math.isfinite(r["train_kd"]) for r in rows)


def test_a_quantized_teacher_teaches(trained_runs, corpus, tmp_path, cli):
    assert cli("quantize", trained_runs["llama"], "--method", "int8", "--out", tmp_path / "q",
               "--eval-tokens", "0", "--decode-tokens", "0").exit_code == 0
    result = cli("distill", "--teacher", tmp_path / "q", "--out", tmp_path / "kd", *student(corpus, "train.max_steps=2"))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("extra,fragments", [
    (["tokenizer.kind=bpe"], ["tokenizer.kind=bpe differs from the teacher's (char)"]),
    (["tokenizer.path=OTHER"], ["is not the teacher's tokenizer"]),
    (["model.vocab_size=500"], ["model.vocab_size=500 differs from the teacher's"]),
    (["model.arch=encoder-decoder"], ["a seq2seq teacher teaches seq2seq students"]),
    (["distill.alpha=1.5"], ["distill.alpha: must be <= 1"]),
    (["distill.temperature=0"], ["distill.temperature: must be > 0"]),
])
def test_bad_students_are_refused_and_nothing_is_written(trained_runs, corpus, tmp_path, cli, one_line_error,
                                                         extra, fragments):
    other = tmp_path / "other.json"
    tokenizer = json.loads((trained_runs["llama"] / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # the same characters, other ids
    other.write_text(json.dumps(tokenizer))
    extra = [item.replace("OTHER", str(other)) for item in extra]
    out = tmp_path / "kd"
    one_line_error(cli("distill", "--teacher", trained_runs["llama"], "--out", out, *student(corpus), *extra), *fragments)
    assert not out.exists()


def test_a_teacher_that_is_not_a_checkpoint_is_refused(trained_runs, corpus, tmp_path, cli, one_line_error):
    out = tmp_path / "kd"
    (tmp_path / "empty").mkdir()
    one_line_error(cli("distill", "--teacher", tmp_path / "empty", "--out", out, *student(corpus)),
                   "--teacher: no model.safetensors in")
    one_line_error(cli("distill", "--teacher", tmp_path / "missing", "--out", out, *student(corpus)),
                   "--teacher: checkpoint not found")
    one_line_error(cli("distill", "--out", out, *student(corpus)), "missing --teacher RUN and --out RUN_DIR")
    one_line_error(cli("distill", "--resume", trained_runs["gpt2"], "train.max_steps=100"), "is not a distillation run")
    assert not out.exists()


@pytest.mark.slow
def test_a_seq2seq_teacher_distils_into_a_recurrent_seq2seq_student(seq2seq_runs, pairs_file, tmp_path, cli):
    out = tmp_path / "kd"
    result = cli("distill", "--teacher", seq2seq_runs["encoder-decoder"], "--out", out, f"data.source={pairs_file}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.task=seq2seq", "data.val_fraction=0.1",
                 "data.test_fraction=0.1", "tokenizer.kind=word", "source_tokenizer.kind=char",
                 "model.arch=gru-seq2seq", "model.n_layer=1", "model.d_model=24", "model.block_size=12",
                 "train.batch_size=16", "train.max_steps=12", "train.warmup_steps=1", "train.eval_interval=12",
                 "train.eval_batches=1", "train.log_interval=1", "train.lr=1e-2", "distill.alpha=0.7",
                 "distill.temperature=2")
    assert result.exit_code == 0, result.output
    rows = [r for r in metrics(out) if "train_loss" in r]
    assert len(rows) == 12 and all(r["train_loss"] == pytest.approx(0.7 * r["train_kd"] + 0.3 * r["train_ce"])
                                   for r in rows)
    assert rows[-1]["train_kd"] < rows[0]["train_kd"] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    generated = cli("generate", out, "abc", "-t", "0", "--json")
    assert generated.exit_code == 0, generated.output
    assert json.loads(generated.stdout)["source"] == "abc"
