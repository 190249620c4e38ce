"""The training loop and `llmcli train`: a complete run directory, exact resume, refusals, NaN stops,
bf16 on CPU, two processes = one with double accumulation, fine-tuning."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmcli.config_loader import load_config
from llmcli.errors import UserError
from llmcli.train import finetune
from llmcli.train import loop as loop_mod
from llmcli.train.loop import train
from llmcli.train.run_dir import RunPlan

TEXT = "".join(
    f"LINE {i}: the quick brown fox jumps over the lazy dog, and so on {i % 7}.\n" for i in range(600)
)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCLI_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


ARCHES = ["transformer", "lstm", "gru", "rnn"]


def tiny(corpus: Path, *extra: str, arch: str = "transformer") -> list[str]:
    family = ["model.n_head=2"] if arch == "transformer" else [f"model.arch={arch}"]
    return [f"data.source={corpus}", *family, "model.n_layer=2", "model.d_model=32",
            "model.block_size=32", "train.batch_size=4", "train.max_steps=12", "train.warmup_steps=2",
            "train.eval_interval=6", "train.eval_batches=2", "train.log_interval=1", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ARCHES)
def test_cli_train_writes_a_complete_run(corpus, tmp_path, cli, arch):
    run = tmp_path / "run"
    result = cli("train", "--out", str(run), *tiny(corpus, arch=arch))
    assert result.exit_code == 0, result.output
    assert "training summary" in result.output and "best val loss" in result.output
    for name in ("config.yaml", "model.safetensors", "model.json", "tokenizer.json", "metrics.jsonl",
                 "best/model.safetensors", "best/tokenizer.json", "last/model.safetensors",
                 "state/trainer_state.json"):
        assert (run / name).exists(), name
    rows = metrics(run)
    train_rows = [r for r in rows if "train_loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert [r["step"] for r in eval_rows] == [6, 12]
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["train_acc"] <= 1 for r in train_rows)
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in eval_rows)
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    saved = load_config(run / "config.yaml")
    assert saved.model.vocab_size is not None and saved.train.max_steps == 12 and saved.model.arch == arch
    info = json.loads((run / "last/checkpoint.json").read_text())
    assert info["step"] == 12


def test_a_recipe_names_its_threads_and_the_option_wins(corpus, tmp_path, cli):
    before = torch.get_num_threads()
    try:
        result = cli("train", "--out", tmp_path / "a", *tiny(corpus, "train.threads=1", "train.max_steps=2"))
        assert result.exit_code == 0 and ", 1 CPU threads" in result.output, result.output
        result = cli("train", "--out", tmp_path / "b", "--threads", "2",
                     *tiny(corpus, "train.threads=1", "train.max_steps=2"))
        assert result.exit_code == 0 and ", 2 CPU threads" in result.output, result.output
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("arch", ARCHES)
def test_resume_is_bit_identical_to_one_run(corpus, tmp_path, cli, arch):
    _resume_is_bit_identical(corpus, tmp_path, cli, arch)


# Each learning-efficiency option (docs/training.md) on, with its family.
OPTIONS = {
    "muon": ("transformer", ["train.optimizer=muon"]),
    "wsd": ("transformer", ["train.schedule=wsd", "train.decay_fraction=0.5"]),
    "ema": ("transformer", ["train.ema_decay=0.9"]),
    "average_last": ("transformer", ["train.average_last=2", "train.eval_interval=3"]),
    "transformer details": ("transformer", ["model.qk_norm=true", "model.act=relu2", "model.logit_softcap=15",
                                            "model.tie_embeddings=false"]),
    "value_embeds": ("transformer", ["model.value_embeds=1", "train.optimizer=muon"]),
    "stateful": ("lstm", ["train.stateful=true", "train.grad_accum=2"]),
    "awd": ("lstm", ["model.embed_dropout=0.1", "model.weight_drop=0.3", "model.d_hidden=48",
                     "train.optimizer=muon", "train.ema_decay=0.5"]),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_resume_is_bit_identical_with_each_option(corpus, tmp_path, cli, option):
    arch, extra = OPTIONS[option]
    _resume_is_bit_identical(corpus, tmp_path, cli, arch, *extra)


def test_ema_weights_are_what_is_evaluated_and_saved(corpus, tmp_path):
    run = tmp_path / "run"
    train(RunPlan(load_config(None, tiny(corpus, "train.ema_decay=0.8", "model.tie_embeddings=false")), run))
    average = load_file(run / "state" / "average.safetensors")
    live = load_file(run / "state" / "model.safetensors")
    for name in ("last", "best"):
        saved = load_file(run / name / "model.safetensors")
        assert saved.keys() == average.keys() and all(torch.equal(saved[k], average[k]) for k in saved)
    assert not all(torch.equal(live[k], average[k]) for k in live)
    # the last evaluation's loss is that of the averaged weights in last/
    from accelerate import Accelerator

    from llmcli.checkpoint import load_model
    from llmcli.data.tasks import prepare_for_task

    cfg = load_config(run / "config.yaml")
    val = loop_mod.training_data(prepare_for_task(cfg), cfg, 1).val
    again = loop_mod.evaluate(load_model(run / "last"), val, cfg.train.eval_batches, Accelerator(cpu=True))
    assert again["val_loss"] == pytest.approx(metrics(run)[-1]["val_loss"], rel=1e-5)


def test_snapshot_average_is_what_is_evaluated_and_saved(corpus, tmp_path):
    """train.average_last=2 with evaluations at steps 6 and 12: last/ holds the mean of the weights
    at those two steps (the live weights of a run stopped at 6, and of the whole run)."""
    half, run = tmp_path / "half", tmp_path / "run"
    extra = ("train.average_last=2", "model.tie_embeddings=false", "train.lr_decay_steps=12")
    train(RunPlan(load_config(None, tiny(corpus, *extra, "train.max_steps=6")), half))
    train(RunPlan(load_config(None, tiny(corpus, *extra)), run))
    at_6, at_12 = load_file(half / "state" / "model.safetensors"), load_file(run / "state" / "model.safetensors")
    saved = load_file(run / "last" / "model.safetensors")
    assert saved.keys() == at_12.keys()
    assert all(torch.allclose(saved[k], (at_6[k] + at_12[k]) / 2, atol=1e-7) for k in saved)
    assert not all(torch.equal(saved[k], at_12[k]) for k in saved)


def test_stateful_training_carries_the_state(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, tiny(corpus, "train.stateful=true", arch="lstm"))
    train(RunPlan(cfg, run))
    carried = load_file(run / "state" / "carry-0.safetensors")
    assert set(carried) == {"state.0", "state.1"} and carried["state.0"].shape == (2, 4, 32)
    assert carried["state.0"].abs().sum() > 0
    # every stream read 12 consecutive windows of 32 tokens, its state carried through all of them
    from safetensors import safe_open

    from llmcli.data.tasks import prepare_for_task

    with safe_open(str(run / "state" / "carry-0.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["positions"]) == [12 * 32] * 4
    windows = loop_mod.training_data(prepare_for_task(cfg), cfg, 1).train.windows
    _, first_labels = windows.batch(0, 0)
    second, _ = windows.batch(1, 0)
    assert windows.continues(1) and torch.equal(second[:, 0], first_labels[:, -1])


def _resume_is_bit_identical(corpus, tmp_path, cli, arch, *options):
    extra = ["model.dropout=0.1", "train.lr_decay_steps=12", *options]
    cfg = load_config(None, tiny(corpus, *extra, arch=arch))
    train(RunPlan(cfg, tmp_path / "straight"))
    half = load_config(None, tiny(corpus, *extra, "train.max_steps=6", arch=arch))
    train(RunPlan(half, tmp_path / "resumed"))
    result = cli("train", "--resume", str(tmp_path / "resumed"), "train.max_steps=12")
    assert result.exit_code == 0, result.output

    assert metrics(tmp_path / "straight") == [
        {**r, "elapsed": s["elapsed"], "tokens_per_second": s["tokens_per_second"]}
        if "elapsed" in r else r
        for r, s in zip(metrics(tmp_path / "resumed"), metrics(tmp_path / "straight"), strict=True)
    ]
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_a_run(corpus, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", "--out", str(run), *tiny(corpus, "train.max_steps=2")).exit_code == 0
    before = (run / "model.safetensors").read_bytes()
    result = cli("train", "--out", str(run), *tiny(corpus, "train.max_steps=3"))
    assert result.exit_code == 2
    assert "already holds a run" in result.output and "--overwrite" in result.output
    assert (run / "model.safetensors").read_bytes() == before
    result = cli("train", "--out", str(run), "--overwrite", *tiny(corpus, "train.max_steps=3"))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "last/checkpoint.json").read_text())["step"] == 3
    assert max(r["step"] for r in metrics(run)) == 3


@pytest.mark.parametrize("args, message", [
    (["--resume", "{tmp}/nothing"], "nothing to resume"),
    (["--out", "{tmp}/r", "model.block_size=100000", "train.check_memory=false"],
     "model.block_size=100000 needs more than"),
    (["--out", "{tmp}/r", "train.mixed_precision=fp16"], "fp16 needs a CUDA GPU"),
    (["--out", "{tmp}/r", "model.n_head=3"], "n_head=3 must divide d_model=32"),
    (["train.max_steps=3"], "missing --out"),
])
def test_bad_input_is_one_line(corpus, tmp_path, cli, args, message):
    if "fp16" in str(args) and torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = cli("train", *tiny(corpus), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_resume_refuses_a_different_model(corpus, tmp_path, cli):
    run = tmp_path / "run"
    train(RunPlan(load_config(None, tiny(corpus, "train.max_steps=2")), run))
    other = tmp_path / "other.yaml"
    other.write_text(f"data: {{source: {corpus}}}\nmodel: {{n_layer: 3, n_head: 2, d_model: 32, block_size: 32}}\n")
    result = cli("train", "--resume", str(run), "--config", str(other))
    assert result.exit_code == 2 and "model.n_layer=3" in result.output and "cannot resume" in result.output
    result = cli("train", "--resume", str(run), "model.n_layer=3")
    assert result.exit_code == 2 and "only train.* settings" in result.output


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = loop_mod.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        if kwargs.get("reduction") is None:  # training loss only
            calls["n"] += 1
            if calls["n"] >= 9:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loop_mod.F, "cross_entropy", poisoned)
    with pytest.raises(UserError, match="non-finite at step 9"):
        train(RunPlan(load_config(None, tiny(corpus)), run))
    assert json.loads((run / "last/checkpoint.json").read_text())["step"] == 6
    weights = load_file(run / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_bf16_autocast_on_cpu_trains(corpus, tmp_path):
    summary = train(RunPlan(load_config(None, tiny(corpus, "train.mixed_precision=bf16", "train.max_steps=4")),
                            tmp_path / "run"))
    assert math.isfinite(summary["best_val_loss"])


@pytest.mark.slow
def test_compiled_training_compiles_once_and_learns_as_eager(corpus, tmp_path):
    """train.compile: one graph for the whole run (evaluations run the uncompiled model; rope tables
    exist before the first forward), and the same losses as the eager run, to float rounding."""
    import torch._dynamo

    llama = ("model.preset=llama", "model.qk_norm=true", "train.optimizer=muon")
    eager = train(RunPlan(load_config(None, tiny(corpus, *llama)), tmp_path / "eager"))
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = train(RunPlan(load_config(None, tiny(corpus, *llama, "train.compile=true")),
                                     tmp_path / "compiled"))
    finally:
        torch._dynamo.reset()  # later tests compile the same forward afresh
    assert compiled["steps"] == eager["steps"] == 12
    for a, b in zip(metrics(tmp_path / "compiled"), metrics(tmp_path / "eager"), strict=True):
        key = "val_loss" if "val_loss" in a else "train_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-3), a["step"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["transformer", "lstm", "gru"])  # rnn: gru's one-tensor state, in the same class
def test_two_processes_match_one_with_double_accumulation(corpus, tmp_path, torchrun, arch):
    """torchrun with 2 CPU (gloo) processes == 1 process with grad_accum=2, within float tolerance."""
    base = tiny(corpus, "train.max_steps=6", "train.eval_interval=6", arch=arch)
    single = load_config(None, [*base, "train.grad_accum=2"])
    train(RunPlan(single, tmp_path / "one"))
    proc = torchrun("train", "--out", tmp_path / "two", *base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    one = [r["train_loss"] for r in metrics(tmp_path / "one") if "train_loss" in r]
    two = [r["train_loss"] for r in metrics(tmp_path / "two") if "train_loss" in r]
    assert len(one) == len(two) == 6
    assert np.allclose(one, two, rtol=1e-4, atol=1e-5), (one, two)


def test_init_from_fine_tunes_from_a_checkpoint(corpus, tmp_path, cli):
    base = tmp_path / "base"
    train(RunPlan(load_config(None, tiny(corpus, "train.max_steps=30", "train.lr=1e-2")), base))
    result = cli("train", "--init-from", base, "--out", tmp_path / "ft", f"data.source={corpus}",
                 "train.max_steps=2", "train.batch_size=4", "train.eval_batches=2", "train.log_interval=1",
                 "model.dropout=0.1")
    assert result.exit_code == 0, result.output
    scratch = metrics(base)[0]["train_loss"]
    tuned = metrics(tmp_path / "ft")[0]["train_loss"]
    assert tuned < scratch - 0.5, (tuned, scratch)
    cfg = load_config(tmp_path / "ft" / "config.yaml")
    assert cfg.model.n_layer == 2 and cfg.model.dropout == 0.1
    assert (tmp_path / "ft" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    result = cli("train", "--init-from", base, "--out", tmp_path / "ft2", "model.n_layer=4")
    assert result.exit_code == 2 and "only model.dropout can change" in result.output


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_max_epochs_counts_passes_over_the_training_tokens(corpus, tmp_path, cli, arch):
    corpus.write_text(TEXT[:len(TEXT) // 6])  # ~50 steps an epoch
    run = tmp_path / "run"
    result = cli("train", "--out", run, *tiny(corpus, "train.max_steps=null", "train.max_epochs=2",
                                              "train.log_interval=5", "train.eval_interval=100", arch=arch))
    assert result.exit_code == 0, result.output
    from llmcli.data.prepare import prepare_data

    train_tokens = len(prepare_data(load_config(run / "config.yaml")).tokens("train"))
    per_epoch = math.ceil(train_tokens / (4 * 32))  # batch 4 x block 32 tokens per step
    rows = [r for r in metrics(run) if "train_loss" in r]
    assert rows[-1]["step"] == 2 * per_epoch and rows[-1]["epoch"] == pytest.approx(2.0)
    assert f"step 5/{2 * per_epoch}  epoch 1/2  loss" in result.stderr
    assert f"step {2 * per_epoch}/{2 * per_epoch}  epoch 2/2  loss" in result.stderr
    assert load_config(run / "config.yaml").train.max_steps is None  # the saved config still counts epochs
    result = cli("train", "--resume", run, "train.max_epochs=3")
    assert result.exit_code == 0, result.output
    assert [r for r in metrics(run) if "train_loss" in r][-1]["step"] == 3 * per_epoch


@pytest.mark.parametrize("args, message", [
    (["model.arch=lstm", "model.n_head=2"], "model.n_head: does not apply to model.arch=lstm"),
    (["model.arch=gru", "train.optimizer=muon", "train.strategy=fsdp"], "train.optimizer: needs train.strategy=ddp"),
    (["train.stateful=true"], "train.stateful: carries a recurrent hidden state; model.arch=transformer has none"),
    (["train.max_epochs=2", "train.max_steps=5"], "give train.max_epochs or train.max_steps, not both"),
])
def test_family_and_epoch_settings_are_one_line_errors(corpus, tmp_path, cli, one_line_error, args, message):
    base = [f"data.source={corpus}", "model.n_layer=2", "model.d_model=32", "model.block_size=32"]
    one_line_error(cli("train", "--out", tmp_path / "r", *base, *args), message)
    assert not (tmp_path / "r").exists()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(corpus, tmp_path, cli, monkeypatch):
    run = tmp_path / "run"
    assert cli("train", "--out", run, *tiny(corpus, "train.max_steps=2")).exit_code == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    real = loop_mod.F.cross_entropy

    def diverges(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if kwargs.get("reduction") is None else loss

    monkeypatch.setattr(loop_mod.F, "cross_entropy", diverges)
    result = cli("train", "--out", run, "--overwrite", *tiny(corpus, "train.max_steps=4"))
    assert result.exit_code == 2 and "non-finite at step 1" in result.output
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus.txt", "run"]  # no staging left
    monkeypatch.setattr(loop_mod.F, "cross_entropy", real)
    assert cli("train", "--out", run, "--overwrite", *tiny(corpus, "train.max_steps=4")).exit_code == 0
    assert max(r["step"] for r in metrics(run)) == 4 and min(r["step"] for r in metrics(run)) == 1


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(corpus, tmp_path, cli):
    full = tmp_path / "full"
    assert cli("train", "--out", full, *tiny(corpus, "train.max_steps=4")).exit_code == 0
    killed = tmp_path / "killed"  # what a kill -9 before the first checkpoint leaves
    killed.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        (killed / name).write_bytes((full / name).read_bytes())
    (killed / "metrics.jsonl").write_text('{"step": 1, "train_loss": 4.0}\n{"step": 2, "tr')
    refused = cli("train", "--out", killed, *tiny(corpus, "train.max_steps=4"))
    assert refused.exit_code == 2 and "--resume" in refused.output
    result = cli("train", "--resume", killed)
    assert result.exit_code == 0, result.output
    assert [r for r in metrics(killed) if "train_loss" in r] == [
        {**r, "elapsed": s["elapsed"], "tokens_per_second": s["tokens_per_second"]}
        for r, s in zip([r for r in metrics(full) if "train_loss" in r],
                        [r for r in metrics(killed) if "train_loss" in r], strict=True)]


def test_resume_with_no_steps_left_is_refused(corpus, tmp_path, cli, one_line_error):
    run = tmp_path / "run"
    assert cli("train", "--out", run, *tiny(corpus, "train.max_steps=4")).exit_code == 0
    rows = metrics(run)
    one_line_error(cli("train", "--resume", run), "already at step 4", "train.max_steps")
    one_line_error(cli("train", "--resume", run, "train.max_steps=3"), "train.max_steps=3 is below the step")
    assert metrics(run) == rows


def test_an_output_may_not_overlap_an_input(corpus, tmp_path, cli, one_line_error):
    base = tmp_path / "base"
    assert cli("train", "--out", base, *tiny(corpus, "train.max_steps=2")).exit_code == 0
    before = {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    for out in (base, base / "ft", base / "best"):
        one_line_error(cli("train", "--init-from", base, "--out", out, "--overwrite", f"data.source={corpus}"),
                       "may not overlap an input")
    link = tmp_path / "link"
    link.symlink_to(base)
    one_line_error(cli("train", "--init-from", base, "--out", link, "--overwrite", f"data.source={corpus}"),
                   "may not overlap an input")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(TEXT)
    one_line_error(cli("train", "--out", data / "run", *tiny(data)), "lies inside the data")
    assert {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("arch, override", [
    ("transformer", "model.n_layer=100000"), ("transformer", "train.batch_size=100000000"),
    ("transformer", "model.d_model=1000000000"), ("lstm", "model.d_model=1000000"), ("gru", "model.n_layer=10000000"),
    ("rnn", "train.batch_size=100000000"),
])
def test_a_run_that_cannot_fit_is_refused_at_once(corpus, tmp_path, cli, one_line_error, arch, override):
    started = time.perf_counter()
    family = ["model.n_head=1"] if arch == "transformer" else []
    one_line_error(cli("train", "--out", tmp_path / "r", *tiny(corpus, arch=arch), override, *family),
                   "this run needs about", "GiB", "train.check_memory=false")
    assert time.perf_counter() - started < 2
    assert not (tmp_path / "r").exists()  # not even an empty --out


@pytest.mark.parametrize("arch, extra", [("transformer", []), ("lstm", []), ("gru", ["model.bias=false"]),
                                         ("rnn", ["model.d_hidden=48", "model.tie_embeddings=false"]),
                                         ("lstm", ["model.n_layer=3", "model.d_hidden=40", "model.tie_embeddings=false"])])
def test_the_estimate_counts_what_the_model_has(corpus, arch, extra):
    from llmcli.models.registry import build_model
    from llmcli.train.memory import estimate

    cfg = load_config(None, tiny(corpus, "model.vocab_size=70", *extra, arch=arch))
    assert estimate(cfg).parameters == build_model(cfg.model).num_params()
    bigger = load_config(None, tiny(corpus, "model.vocab_size=70", "train.batch_size=8", *extra, arch=arch))
    assert estimate(bigger).activation_bytes == 2 * estimate(cfg).activation_bytes  # batch 4 -> 8


def test_out_of_memory_is_one_line(corpus, tmp_path, cli, one_line_error, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 8000000000000 bytes.")

    monkeypatch.setattr(finetune, "build_model", fails)
    one_line_error(cli("train", "--out", tmp_path / "r", *tiny(corpus)), "out of memory", "can't allocate")


def test_random_windows_read_across_shards_as_from_one_array(tmp_path):
    """Windows drawn from token shards are those of the concatenated array, and each micro-batch index
    (each process of a multi-process run draws its own) gets its own windows."""
    from llmcli.data.shards import read_stream, write_stream
    from llmcli.train.schedule import RandomWindows

    tokens = np.random.default_rng(0).integers(0, 1000, 10_000).astype(np.uint16)
    entries = [*write_stream(tmp_path, "a", tokens[:3001], np.uint16), *write_stream(tmp_path, "b", tokens[3001:], np.uint16)]
    shards = read_stream(tmp_path, entries, np.uint16)
    flat, sharded = RandomWindows(tokens, 64, 32, seed=5), RandomWindows(shards, 64, 32, seed=5)
    for step in range(5):
        for index in range(2):
            assert all(torch.equal(a, b) for a, b in zip(flat.batch(step, index), sharded.batch(step, index), strict=True))
        rank0, rank1 = sharded.batch(step, 0)[0], sharded.batch(step, 1)[0]
        assert not torch.equal(rank0, rank1)


@pytest.mark.slow
def test_two_processes_on_shards_draw_their_own_windows_and_resume_exactly(corpus, tmp_path, torchrun, monkeypatch):
    """2 processes on a corpus in many shards == 1 process with grad_accum=2 (each process draws its own
    micro-batch of one sequence), and stopping at step 3 then --resume gives the same run."""
    import llmcli.data.encode as encode_mod
    import llmcli.data.shards as shards_mod
    from llmcli.data.prepare import prepare_data

    monkeypatch.setattr(shards_mod, "SHARD_TOKENS", 4000)  # shards close at blocks of 2000 characters
    monkeypatch.setattr(encode_mod, "BLOCK_CHARS", 2000)
    monkeypatch.setattr(encode_mod, "PIECE_CHARS", 500)
    base = tiny(corpus, "train.max_steps=6", "train.eval_interval=3", "train.lr_decay_steps=6")
    assert len(prepare_data(load_config(None, base)).meta["shards"]["train"]) >= 8  # the cache the runs reuse
    train(RunPlan(load_config(None, [*base, "train.grad_accum=2"]), tmp_path / "one"))
    for args in (["--out", tmp_path / "two", *base], ["--out", tmp_path / "resumed", *base, "train.max_steps=3"],
                 ["--resume", tmp_path / "resumed", "train.max_steps=6"]):
        proc = torchrun("train", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {run: [r["train_loss"] for r in metrics(tmp_path / run) if "train_loss" in r]
              for run in ("one", "two", "resumed")}
    assert len(losses["two"]) == 6 and losses["resumed"] == losses["two"]
    assert np.allclose(losses["one"], losses["two"], rtol=1e-4, atol=1e-5), losses
