"""train.strategy over 2 CPU (gloo) processes: FSDP and DeepSpeed ZeRO-2 give DDP's losses, save
sharded state, resume exactly and consolidate into DDP's weights; the refusals are one line and
change nothing."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmcli.config_loader import load_config
from llmcli.models.transformer import Transformer
from llmcli.train.loop import train
from llmcli.train.run_dir import RunPlan

TEXT = "".join(f"LINE {i}: the quick brown fox jumps over the lazy dog, and so on {i % 7}.\n" for i in range(600))


def args(root: Path, *extra: str) -> list[str]:
    """A 6-step tiny run checkpointed at step 3, whose schedule does not depend on max_steps."""
    return [f"data.source={root / 'corpus.txt'}", f"data.cache_dir={root / 'cache'}", "model.n_layer=2",
            "model.n_head=2", "model.d_model=32", "model.block_size=32", "train.batch_size=4",
            "train.max_steps=6", "train.lr_decay_steps=6", "train.warmup_steps=2", "train.eval_interval=3",
            "train.eval_batches=2", "train.log_interval=1", *extra]


def losses(run: Path) -> list[float]:
    return [row["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in (row := json.loads(line))]


def held_kib(stderr: str) -> float:
    """Weights + optimizer state of the largest process, from `llmcli train`'s memory line."""
    found = re.search(r"weights ([\d.]+) KiB, optimizer state ([\d.]+) KiB", stderr)
    assert found, stderr[-2000:]
    return float(found[1]) + float(found[2])


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("strategy")
    (path / "corpus.txt").write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def ddp(root, torchrun) -> Path:
    """The reference: the same run under DDP with 2 processes."""
    proc = torchrun("train", "--out", root / "ddp", *args(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "ddp.log").write_text(proc.stderr)
    return root / "ddp"


def sharded_matches_ddp(root: Path, ddp: Path, torchrun, name: str, *strategy: str) -> tuple[Path, float]:
    """Train 3 steps, resume to 6 with 2 processes; check against DDP; the resumed run and the
    share of DDP's per-process weights + optimizer state it held."""
    run = root / name
    first = torchrun("train", "--out", run, *args(root, *strategy, "train.max_steps=3"))
    assert first.returncode == 0, first.stderr[-3000:]
    head = first.stderr[first.stderr.index("world size 2"):].splitlines()[:4]
    assert any(line.split(" ", 2)[-1].startswith(f"strategy {strategy[0].split('=')[1]}") for line in head), head
    assert "memory per process after step 1 (largest of 2)" in first.stderr
    assert json.loads((run / "state" / "strategy.json").read_text())["world_size"] == 2
    second = torchrun("train", "--resume", run, "train.max_steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    assert np.allclose(losses(run), losses(ddp), rtol=1e-5, atol=1e-6), (losses(run), losses(ddp))
    for name_ in ("model.safetensors", "best/model.safetensors"):
        mine, theirs = load_file(run / name_), load_file(ddp / name_)
        assert mine.keys() == theirs.keys()
        assert all(mine[k].dtype == torch.float32 and torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine)
    return run, held_kib(first.stderr) / held_kib((root / "ddp.log").read_text())


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_exactly_and_consolidates(root, ddp, torchrun):
    resumed, share = sharded_matches_ddp(root, ddp, torchrun, "fsdp", "train.strategy=fsdp")
    assert share == pytest.approx(0.5, abs=0.02)  # every tensor split in two
    assert (resumed / "state" / "fsdp" / "optimizer_0" / ".metadata").is_file()
    straight = torchrun("train", "--out", root / "fsdp-straight", *args(root, "train.strategy=fsdp"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert losses(resumed) == losses(root / "fsdp-straight")
    a, b = load_file(resumed / "model.safetensors"), load_file(root / "fsdp-straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (pip install -e .[deepspeed])")
def test_deepspeed_zero2_matches_ddp_and_resumes(root, ddp, torchrun):
    resumed, share = sharded_matches_ddp(root, ddp, torchrun, "zero2", "train.strategy=deepspeed",
                                         "train.zero_stage=2")
    assert share == pytest.approx(0.83, abs=0.03)  # whole weights; half the moments, half a float32 master
    assert len(list((resumed / "state" / "deepspeed" / "state").glob("*_optim_states.pt"))) == 2


@pytest.mark.slow
def test_a_changed_world_size_is_refused_and_nothing_changes(ddp, cli, one_line_error):
    before = snapshot(ddp)
    one_line_error(cli("train", "--resume", ddp, "train.max_steps=9"), "written by 2 process(es); this run has 1")
    assert snapshot(ddp) == before


@pytest.fixture
def corpus(tmp_path) -> Path:
    (tmp_path / "corpus.txt").write_text(TEXT)
    return tmp_path


@pytest.mark.parametrize("override, fragment", [
    ("train.strategy=zero", "train.strategy"),
    ("train.strategy=fsdp", "runs under a launcher"),
    ("train.cpu_offload=true", "needs train.strategy=fsdp or deepspeed"),
])
def test_bad_strategies_are_one_line(corpus, cli, one_line_error, override, fragment):
    one_line_error(cli("train", "--out", corpus / "run", *args(corpus), override), fragment)
    assert not (corpus / "run").exists()


def test_deepspeed_missing_names_the_package(corpus, cli, one_line_error, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    one_line_error(cli("train", "--out", corpus / "run", *args(corpus), "train.strategy=deepspeed"),
                   "needs the deepspeed package", "pip install")
    assert not (corpus / "run").exists()


@pytest.mark.parametrize("strategy", [["train.strategy=fsdp"], ["train.strategy=deepspeed", "train.zero_stage=3"]])
def test_a_family_that_cannot_be_partitioned_is_refused(corpus, cli, one_line_error, monkeypatch, strategy):
    monkeypatch.setattr(Transformer, "partition_refusal", "its weights are one fused tensor")
    one_line_error(cli("train", "--out", corpus / "run", *args(corpus), *strategy),
                   "partitions the weights", "its weights are one fused tensor", "train.strategy=ddp")
    assert not (corpus / "run").exists()


def test_resume_with_another_strategy_is_refused_and_nothing_changes(corpus, cli, one_line_error):
    train(RunPlan(load_config(None, args(corpus, "train.max_steps=3")), corpus / "run"))
    before = snapshot(corpus / "run")
    one_line_error(cli("train", "--resume", corpus / "run", "train.max_steps=6", "train.strategy=fsdp"),
                   "was written with train.strategy=ddp", "resume with train.strategy=ddp")
    assert snapshot(corpus / "run") == before


def test_an_engine_file_may_not_set_what_train_keys_set(corpus, cli, one_line_error):
    (corpus / "accelerate.yaml").write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: NO_SHARD\n")
    one_line_error(cli("train", "--out", corpus / "run", *args(corpus), "train.strategy=fsdp",
                       f"train.accelerate_config={corpus / 'accelerate.yaml'}"),
                   "fsdp_config.fsdp_sharding_strategy is set by train.fsdp_sharding")
    assert not (corpus / "run").exists()


def test_a_lora_run_is_not_sharded(corpus, cli, one_line_error, trained_runs):
    one_line_error(cli("train", "--init-from", trained_runs["gpt2"], "--out", corpus / "run",
                       f"data.source={corpus / 'corpus.txt'}", "train.lora.r=4", "train.strategy=fsdp"),
                   "train.lora with train.strategy=fsdp", "use train.strategy=ddp")
    assert not (corpus / "run").exists()
