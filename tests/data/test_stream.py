"""Corpora of any size: shards, worker processes, resuming a killed build, bounded memory, hub
streaming, tokenizer samples, progress lines, and the bad inputs (one line naming the file, nothing
cached)."""

import bz2
import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from rich.console import Console

import llmcli.data.encode as encode_mod
import llmcli.data.shards as shards_mod
from llmcli.data.prepare import cache_dir_for, load_prepared, prepare_data
from llmcli.errors import UserError

WORDS = "the quick brown fox jumps over the lazy dog and runs far away from home tonight".split()


def text_of(lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 12)) + ".\n" for _ in range(lines))


def quiet() -> Console:
    return Console(quiet=True)


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_many_shards_and_worker_processes_give_the_same_tokens(tmp_path, monkeypatch, cfg, kind):
    (tmp_path / "a.txt").write_text(text_of(900))
    (tmp_path / "b.txt").write_text(text_of(700, seed=1))
    settings = [f"data.source={tmp_path}", f"tokenizer.kind={kind}", "tokenizer.vocab_size=300",
                "tokenizer.min_frequency=1", "data.num_proc=1"]
    one = prepare_data(cfg(*settings), console=quiet())
    first, val, stats = np.asarray(one.tokens("train")).copy(), np.asarray(one.tokens("val")).copy(), one.stats
    monkeypatch.setattr(shards_mod, "SHARD_TOKENS", 5000)
    monkeypatch.setattr(encode_mod, "BLOCK_CHARS", 3000)
    monkeypatch.setattr(encode_mod, "PIECE_CHARS", 200)
    many = prepare_data(cfg(*settings[:-1], "data.num_proc=2"), console=quiet(), force=True)
    assert many.dir == one.dir  # neither processes nor shard sizes are in the key
    assert len(many.meta["shards"]["train"]) > 3
    assert np.array_equal(np.asarray(many.tokens("train")), first)
    assert np.array_equal(np.asarray(many.tokens("val")), val)
    assert many.stats == stats
    tokens = many.tokens("train")  # windows across shard boundaries read as one array
    edge = many.meta["shards"]["train"][0][1]
    assert np.array_equal(tokens[edge - 7:edge + 9], first[edge - 7:edge + 9]) and tokens[-1] == first[-1]


def test_progress_lines_in_a_pipe(tmp_path, monkeypatch, cfg, quiet):
    import llmcli.data.progress as progress_mod

    monkeypatch.setattr(progress_mod, "QUIET_SECONDS", 0.0)
    monkeypatch.setattr(progress_mod, "LOG_SECONDS", 0.0)
    (tmp_path / "a.txt").write_text(text_of(3000))
    monkeypatch.setattr(encode_mod, "BLOCK_CHARS", 20_000)
    console, out = quiet()
    prepare_data(cfg(f"data.source={tmp_path / 'a.txt'}", "tokenizer.kind=bpe", "tokenizer.vocab_size=300"),
                 console=console)
    lines = out.getvalue().splitlines()
    assert any(" scan: " in line and "MB/s" in line for line in lines)
    assert any(" bpe tokenizer: " in line for line in lines)
    during = [line for line in lines if " encode: " in line and "ETA" in line]
    assert during and all("%)" in line and "tokens" in line and "\x1b" not in line for line in during)


def test_tokenizer_train_bytes_takes_a_sample_spread_over_the_corpus(tmp_path, monkeypatch, cfg):
    monkeypatch.setattr(encode_mod, "PIECE_CHARS", 500)
    early, late = "alpha beta gamma delta\n" * 2000, "omega sigma kappa theta\n" * 2000
    (tmp_path / "a.txt").write_text(early + late)
    settings = [f"data.source={tmp_path / 'a.txt'}", "tokenizer.kind=word", "tokenizer.min_frequency=1",
                "data.val_fraction=0.05"]
    whole = prepare_data(cfg(*settings), console=quiet())
    sampled = prepare_data(cfg(*settings, "tokenizer.train_bytes=9000"), console=quiet())
    assert sampled.dir != whole.dir and whole.meta["tokenizer_sample"] == {"bytes": whole.stats["train"]["bytes"]}
    sample = sampled.meta["tokenizer_sample"]
    assert sample["train_bytes"] == 9000 and abs(sample["bytes"] - 9000) <= 2 * encode_mod.PIECE_CHARS
    assert sample["of"] == sampled.stats["train"]["bytes"]
    vocab = json.loads(sampled.tokenizer_path.read_text())["model"]["vocab"]
    assert {"alpha", "omega"} <= set(vocab)  # from both ends of the corpus


def test_kill_9_during_prepare_then_rerun_reuses_the_finished_shards(tmp_path, cfg):
    (tmp_path / "a.txt").write_text(text_of(6000))
    settings = [f"data.source={tmp_path / 'a.txt'}", "tokenizer.kind=bpe",
                "tokenizer.vocab_size=300", "data.num_proc=1"]
    script = (
        "import sys, time\n"
        "import llmcli.data.encode as e, llmcli.data.shards as s\n"
        "e.BLOCK_CHARS = 4000; s.SHARD_TOKENS = 3000\n"
        "close = s.ShardWriter.close_shard\n"
        "def slow(self):\n    close(self)\n    time.sleep(0.15)\n"
        "s.ShardWriter.close_shard = slow\n"
        "from rich.console import Console\n"
        "from llmcli.config_loader import load_config\n"
        "from llmcli.data.prepare import prepare_data\n"
        "prepare_data(load_config(None, sys.argv[2:]), force=sys.argv[1] == 'force', console=Console(quiet=True))\n"
    )
    env = dict(os.environ)  # LLMCLI_CACHE_DIR: this test's cache
    target = cache_dir_for(cfg(*settings))
    ledger = target.with_name(f".{target.name}.partial") / "shards.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", script, "-", *settings], env=env)
    deadline = time.time() + 120
    while not (ledger.is_file() and ledger.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists() and load_prepared(target) is None  # nothing a training run could pick up
    first_shard = ledger.parent / "train-00000.bin"
    kept = first_shard.stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", script, "-", *settings], env=env, check=True, timeout=300)
    resumed = load_prepared(target)
    assert resumed is not None and (target / "train-00000.bin").stat().st_mtime_ns == kept
    assert not (target / "shards.jsonl").exists() and not ledger.parent.exists()
    files = {p.name: p.read_bytes() for p in target.glob("*.bin")}
    subprocess.run([sys.executable, "-c", script, "force", *settings], env=env, check=True, timeout=300)
    assert {p.name: p.read_bytes() for p in target.glob("*.bin")} == files
    assert json.loads((target / "meta.json").read_text())["splits"] == resumed.stats


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS of `data prepare` (byte-level BPE, one process) on a 3 MB and a 24 MB corpus."""
    peaks = {}
    for mb in (3, 24):
        path = tmp_path / f"{mb}.txt"
        base = text_of(2000).encode()
        path.write_bytes(base * (mb * 10**6 // len(base)))
        code = ("import resource, sys\nfrom llmcli.cli import main\nsys.argv = ['llmcli'] + sys.argv[1:]\n"
                "try: main()\nexcept SystemExit: pass\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code, "data", "prepare", f"data.source={path}",
                              f"data.cache_dir={tmp_path / str(mb)}", "tokenizer.kind=bpe", "tokenizer.vocab_size=400",
                              "data.num_proc=1"], capture_output=True, text=True, check=True, timeout=600)
        peaks[mb] = int(out.stdout.strip().splitlines()[-1]) * 1024
    assert peaks[24] < peaks[3] * 1.15 + 20e6, peaks  # 8x the corpus, about the same memory


def test_hub_streaming_reads_local_parquet_and_jsonl_as_it_goes(tmp_path, monkeypatch, cfg):
    pa = pytest.importorskip("pyarrow")
    import datasets
    import pyarrow.parquet as pq

    rows = [{"text": line} for line in text_of(400).splitlines(keepends=True)]
    pq.write_table(pa.Table.from_pylist(rows[:350]), tmp_path / "train.parquet")
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[350:]))
    real = datasets.load_dataset
    calls = []

    def local_hub(name, config=None, streaming=False):
        calls.append(streaming)
        if name == "org/plain":
            return real("parquet", data_files={"train": str(tmp_path / "train.parquet")}, streaming=streaming)
        return datasets.IterableDatasetDict({
            "train": real("parquet", data_files=str(tmp_path / "train.parquet"), split="train", streaming=streaming),
            "validation": real("json", data_files=str(tmp_path / "val.jsonl"), split="train", streaming=streaming)})

    monkeypatch.setattr(datasets, "load_dataset", local_hub)
    streamed = prepare_data(cfg("data.source=hf:org/set", "data.streaming=true"), console=quiet())
    assert calls == [True] and isinstance(streamed.tokens("train"), shards_mod.TokenShards)
    assert streamed.stats["train"]["documents"] == 350 and streamed.stats["val"]["documents"] == 50
    local = prepare_data(cfg(f"data.source={tmp_path / 'train.parquet'}", "data.val_fraction=0"), console=quiet())
    assert np.array_equal(np.asarray(streamed.tokens("train")), np.asarray(local.tokens("train")))
    with pytest.raises(UserError, match="hf:org/plain has no validation split and data.streaming=true reads it once"):
        prepare_data(cfg("data.source=hf:org/plain", "data.streaming=true"), console=quiet())
    drawn = prepare_data(cfg("data.source=hf:org/plain", "data.streaming=true", "data.split_by=document"),
                         console=quiet())
    assert 15 <= drawn.stats["val"]["documents"] <= 60 and sum(s["documents"] for s in drawn.stats.values()) == 350


def test_json_list_csv_and_replaced_bytes(tmp_path, cfg, load_corpus):
    records = [{"text": f"record {i} with some words\n"} for i in range(30)]
    (tmp_path / "list.json").write_text(json.dumps(records, indent=1))
    corpus = load_corpus(cfg(f"data.source={tmp_path / 'list.json'}", "data.val_fraction=0").data)
    assert corpus["train"] == [r["text"] for r in records]
    (tmp_path / "t.csv").write_bytes(b"id,text\n1,caf\xe9 ok\n2,fine\n")
    corpus = load_corpus(cfg(f"data.source={tmp_path / 't.csv'}", "data.val_fraction=0",
                             "data.encoding_errors=replace").data)
    assert corpus["train"] == ["caf\ufffd ok", "fine"]


def _expect_one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("name, content, words", [
    ("bad.txt.gz", gzip.compress(text_of(3000).encode())[:-200], ["bad.txt.gz", "corrupt gzip data"]),
    ("bad.txt.bz2", b"BZh9" + b"\0garbage" * 20, ["bad.txt.bz2", "corrupt bzip2 data"]),
    ("notgz.txt.gz", b"plain text, not gzip\n", ["notgz.txt.gz", "corrupt gzip data"]),
    ("image.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)), ["image.txt", "binary file", "byte 8"]),
    ("late.txt", b"text\n" * 1000 + b"\0rest", ["late.txt", "binary file", "byte 5,000"]),
    ("bad.txt", b"ok\n" * 10 + b"caf\xe9\n", ["bad.txt", "not valid UTF-8 at byte 33 (line 11)"]),
    ("rows.jsonl", b'{"text": "ok"}\n{"text": broken}\n', ["rows.jsonl line 2", "not valid JSON"]),
    ("rows2.jsonl", b'{"body": "ok"}\n', ["rows2.jsonl", "no column 'text'", "columns: body"]),
    ("num.jsonl", b'{"text": 5}\n', ["num.jsonl line 1", "holds int, not text"]),
    ("empty.txt", b"", ["empty.txt", "is empty"]),
])
def test_bad_inputs_fail_on_one_line_and_cache_nothing(tmp_path, cfg, name, content, words, cache_dir):
    (tmp_path / name).write_bytes(content)
    c = cfg(f"data.source={tmp_path / name}")
    with pytest.raises(UserError) as info:
        prepare_data(c, console=quiet())
    _expect_one_line(info, *words)
    assert not [p for p in cache_dir.iterdir() if not p.name.endswith(".lock")]


def test_parquet_without_the_text_field_and_a_glob_matching_nothing(tmp_path, cfg):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "p.parquet")
    with pytest.raises(UserError) as info:
        prepare_data(cfg(f"data.source={tmp_path / 'p.parquet'}"), console=quiet())
    _expect_one_line(info, "p.parquet", "no column 'text'", "columns: body")
    with pytest.raises(UserError) as info:
        prepare_data(cfg(f"data.source={tmp_path}/*.txt.zst"), console=quiet())
    _expect_one_line(info, "no files match", "*.txt.zst")
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError) as info:
        prepare_data(cfg(f"data.source={tmp_path / 'sub'}"), console=quiet())
    _expect_one_line(info, "sub", "contains no supported files")


def test_a_full_disk_removes_the_partial_cache(tmp_path, monkeypatch, cfg, cache_dir):
    (tmp_path / "a.txt").write_text(text_of(500))
    monkeypatch.setattr(shards_mod, "SHARD_TOKENS", 2000)
    write = shards_mod.ShardWriter.write
    calls = []

    def fill_up(self, ids):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "train-00001.bin"))
        write(self, ids)

    monkeypatch.setattr(shards_mod.ShardWriter, "write", fill_up)
    monkeypatch.setattr(encode_mod, "BLOCK_CHARS", 2000)
    with pytest.raises(UserError) as info:
        prepare_data(cfg(f"data.source={tmp_path / 'a.txt'}"), console=quiet())
    _expect_one_line(info, "no space left on the device", "train-00001.bin", "partial cache was removed")
    assert not [p for p in cache_dir.iterdir() if not p.name.endswith(".lock")]


def test_encoding_errors_replace_reads_compressed_text(tmp_path, cfg, quiet):
    (tmp_path / "a.txt.bz2").write_bytes(bz2.compress(b"caf\xe9 au lait\n" * 50))
    console, out = quiet()
    prepared = prepare_data(cfg(f"data.source={tmp_path / 'a.txt.bz2'}", "data.encoding_errors=replace"),
                            console=console)
    assert prepared.stats["train"]["documents"] == 1
    assert out.getvalue().count("replaced 50 invalid UTF-8 byte sequence(s)") == 1


def test_blocks_cut_inside_characters_records_and_lines(tmp_path, monkeypatch, cfg, load_corpus):
    import llmcli.data.readers as readers

    monkeypatch.setattr(readers, "BLOCK_BYTES", 7)  # every multi-byte character and record cut somewhere
    raw = "héllo wörld 日本語 😀 end\n".encode() * 3 + b"bad\xff\xfe here\n" + "ünï\n".encode()
    (tmp_path / "a.txt").write_bytes(raw)
    corpus = load_corpus(cfg(f"data.source={tmp_path / 'a.txt'}", "data.val_fraction=0",
                             "data.encoding_errors=replace").data)
    assert corpus["train"] == [raw.decode("utf-8", errors="replace")]
    records = [{"text": f"récord {i} 😀"} for i in range(12)]
    (tmp_path / "b.json").write_text(json.dumps(records, ensure_ascii=False))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for name in ("b.json", "c.jsonl"):
        corpus = load_corpus(cfg(f"data.source={tmp_path / name}", "data.val_fraction=0").data)
        assert corpus["train"] == [r["text"] for r in records]
