"""Training sequence-to-sequence models: bucketed padded batches, label smoothing, exact resume,
and the refusals of settings that belong to the other task."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmcli.config_loader import load_config
from llmcli.train.batches import IGNORE
from llmcli.train.loop import train
from llmcli.train.run_dir import RunPlan

pytestmark = pytest.mark.slow


def _settings(pairs_file, tmp_path, arch, *extra):
    return load_config(None, [f"data.source={pairs_file}", f"data.cache_dir={tmp_path / 'cache'}",
                              f"model.arch={arch}", "tokenizer.kind=word", "source_tokenizer.kind=char",
                              "model.n_layer=1", "model.d_model=16", "model.block_size=12", "model.dropout=0.1",
                              "train.batch_size=8", "train.max_steps=8", "train.warmup_steps=2",
                              "train.eval_interval=4", "train.eval_batches=1", "train.log_interval=1",
                              "train.lr_decay_steps=8", "train.label_smoothing=0.1",
                              *(["model.n_head=2"] if arch == "encoder-decoder" else []), *extra])


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_second")} for r in rows]


@pytest.mark.parametrize("arch, extra", [("encoder-decoder", []), ("lstm-seq2seq", []),
                                         ("encoder-decoder", ["train.batch_tokens=90", "train.ema_decay=0.9",
                                                              "train.optimizer=muon", "train.schedule=wsd"]),
                                         ("encoder-decoder", ["train.pack_pairs=true", "train.average_last=2"])])
def test_resume_is_bit_identical_to_one_run(pairs_file, tmp_path, cli, arch, extra):
    train(RunPlan(_settings(pairs_file, tmp_path, arch, *extra), tmp_path / "straight"))
    train(RunPlan(_settings(pairs_file, tmp_path, arch, *extra, "train.max_steps=4"), tmp_path / "resumed"))
    result = cli("train", "--resume", str(tmp_path / "resumed"), "train.max_steps=8")
    assert result.exit_code == 0, result.output
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "resumed")
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "resumed" / "best" / "source_tokenizer.json").is_file()


def test_resume_with_its_config_file(pairs_file, tmp_path, cli, one_line_error):
    """`train -c CONFIG --resume R` takes the config that started R: the sizes the data decided
    (vocab_size, src_vocab_size) are the run's, not a difference; a changed source side is refused."""
    config = tmp_path / "g2p.yaml"
    config.write_text(f"data: {{task: seq2seq, source: {pairs_file}, cache_dir: {tmp_path / 'cache'}}}\n"
                      "tokenizer: {kind: word}\nsource_tokenizer: {kind: char}\n"
                      "model: {arch: gru-seq2seq, n_layer: 1, d_model: 16, block_size: 12}\n"
                      "train: {batch_size: 8, max_steps: 2, eval_interval: 2, eval_batches: 1}\n")
    run = tmp_path / "run"
    assert cli("train", "-c", config, "--out", run).exit_code == 0
    result = cli("train", "-c", config, "--resume", run, "train.max_steps=4")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "last" / "checkpoint.json").read_text())["step"] == 4
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace("source_tokenizer: {kind: char}", "source_tokenizer: {kind: bpe}"))
    one_line_error(cli("train", "-c", other, "--resume", run, "train.max_steps=6"),
                   "source_tokenizer.kind='bpe'", "cannot resume")


def test_batches_are_bucketed_padded_and_masked(pairs_file, tmp_path):
    from llmcli.data.tasks import prepare_for_task
    from llmcli.train.batches import training_data
    from llmcli.train.loop import _resolve

    cfg = _settings(pairs_file, tmp_path, "encoder-decoder")
    prepared = prepare_for_task(cfg)
    data = training_data(prepared, _resolve(cfg, prepared), 1)
    seen = set()
    for step in range(data.train.epoch_steps):
        inputs, labels = data.train.batch(step, 0)
        lengths = inputs["source_lengths"]
        assert lengths.max() - lengths.min() <= 2  # sorted by length: little padding
        assert inputs["source"].shape[1] == lengths.max()
        real = labels != IGNORE
        assert torch.equal(real.sum(1), (inputs["idx"][:, 1:] != prepared.eot_id).sum(1) + 1)
        assert (inputs["idx"][:, 0] == prepared.eot_id).all()
        seen.update(map(tuple, inputs["source"].tolist()))
    assert len(seen) == len(data.train.kept)  # every training pair once per epoch


def test_token_budget_batches_fill_the_budget_and_cover_every_pair(pairs_file, tmp_path):
    from llmcli.data.tasks import prepare_for_task
    from llmcli.train.batches import training_data
    from llmcli.train.loop import _resolve

    cfg = _settings(pairs_file, tmp_path, "encoder-decoder", "train.batch_tokens=120")
    prepared = prepare_for_task(cfg)
    data = training_data(prepared, _resolve(cfg, prepared), 1)
    seen, sizes = [], []
    for step in range(data.train.epoch_steps):
        inputs, labels = data.train.batch(step, 0)
        assert inputs["source"].numel() + labels.numel() <= 120
        seen += map(tuple, inputs["source"].tolist())
        sizes.append(len(labels))
    assert len(seen) == len(set(seen)) == len(data.train.kept)  # every pair once per epoch
    assert max(sizes) > min(sizes)  # short pairs come in bigger batches
    assert data.train.tokens_per_step == pytest.approx(
        (data.train.tgt_len.sum() + len(data.train.tgt_len)) / data.train.epoch_steps)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_packed_rows_give_each_pair_its_unpacked_loss(pairs_file, tmp_path, norm):
    """A batch's pairs packed into rows score, pair by pair, what they score padded one per row."""
    from llmcli.data.tasks import prepare_for_task
    from llmcli.models.registry import build_model
    from llmcli.train.batches import training_data
    from llmcli.train.loop import _resolve

    cfg = _settings(pairs_file, tmp_path, "encoder-decoder", "train.pack_pairs=true", "model.block_size=24",
                    "model.source_block_size=24", f"model.norm_placement={norm}", "model.pos=learned")
    prepared = prepare_for_task(cfg)
    cfg = _resolve(cfg, prepared)
    batches = training_data(prepared, cfg, 1).train
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    chunk = batches._chunk(0, 0)
    packed, packed_labels = batches.packed(chunk)
    assert len(packed_labels) < len(chunk)  # several pairs share a row
    assert (packed["source_segments"].max(1).values > 1).any()
    batches.pack = False
    padded, padded_labels = batches.collate(chunk)

    def per_pair(inputs, labels, segments):
        """Each pair's summed loss, keyed by its source tokens."""
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(model(**inputs).flatten(0, 1), labels.flatten(),
                                                       ignore_index=IGNORE, reduction="none").view(labels.shape)
        out = {}
        for r in range(len(labels)):
            for segment in segments(r):
                source_at, target_at = segment
                out[tuple(inputs["source"][r, source_at].tolist())] = losses[r, target_at].sum().item()
        return out

    def packed_segments(r):
        for j in range(1, int(packed["source_segments"][r].max()) + 1):
            yield packed["source_segments"][r] == j, packed["target_segments"][r] == j

    def padded_segments(r):
        yield slice(0, int(padded["source_lengths"][r])), padded_labels[r] != IGNORE

    got, expected = per_pair(packed, packed_labels, packed_segments), per_pair(padded, padded_labels, padded_segments)
    assert got.keys() == expected.keys() and len(got) == len(chunk)
    assert all(got[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-5) for k in got)
    assert sum(got.values()) == pytest.approx(sum(expected.values()), rel=1e-6)


def test_packed_batches_cover_every_pair_within_the_lengths(pairs_file, tmp_path):
    from llmcli.data.tasks import prepare_for_task
    from llmcli.train.batches import training_data
    from llmcli.train.loop import _resolve

    cfg = _settings(pairs_file, tmp_path, "encoder-decoder", "train.pack_pairs=true")
    prepared = prepare_for_task(cfg)
    cfg = _resolve(cfg, prepared)
    data = training_data(prepared, cfg, 1)
    seen = 0
    for step in range(data.train.epoch_steps):
        inputs, labels = data.train.batch(step, 0)
        assert inputs["source"].shape[1] <= cfg.model.source_context and labels.shape[1] <= cfg.model.block_size
        assert "source_lengths" not in inputs
        seen += int((labels == prepared.eot_id).sum())  # one end token per pair
    assert seen == len(data.train.kept)


@pytest.mark.parametrize("overrides, fragment", [
    (["data.task=seq2seq", "model.arch=transformer"], "data.task=seq2seq needs a sequence-to-sequence model.arch"),
    (["model.arch=gru-seq2seq", "data.task=lm"], "maps a source to a target: set data.task=seq2seq"),
    (["data.task=seq2seq", "data.format=alpaca"], "data.format: does not apply to data.task=seq2seq"),
    (["data.task=seq2seq", "data.text_field=x"], "data.text_field: does not apply to data.task=seq2seq"),
    (["data.source_field=x"], "data.source_field: does not apply to data.task=lm"),
    (["source_tokenizer.kind=char"], "source_tokenizer.kind: does not apply to data.task=lm"),
    (["data.task=seq2seq", "model.share_embeddings=true", "source_tokenizer.kind=char"], "set source_tokenizer.kind=shared"),
    (["data.task=seq2seq", "data.source_lang=de"], "set both data.source_lang and data.target_lang"),
    (["train.pack_pairs=true"], "train.pack_pairs: packs (source, target) pairs into rows: set it with data.task=seq2seq"),
    (["data.task=seq2seq", "model.arch=gru-seq2seq", "train.pack_pairs=true"],
     "train.pack_pairs: model.arch=gru-seq2seq cannot train on packed rows"),
    (["data.task=seq2seq", "model.arch=encoder-decoder", "train.pack_pairs=true", "train.batch_tokens=200"],
     "set one of them"),
    (["train.average_last=2", "train.ema_decay=0.9"], "set one of them"),
    (["train.average_last=1"], "train.average_last"),
])
def test_settings_of_the_other_task_are_refused(tmp_path, cli, one_line_error, overrides, fragment):
    one_line_error(cli("train", "--out", tmp_path / "run", *overrides), fragment)
    assert not (tmp_path / "run").exists()
