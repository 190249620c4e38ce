import json

import numpy as np
import pytest
from rich.console import Console

from llmcli.data.prepare import prepare_data
from llmcli.tokenizer import load_tokenizer


def document_encoder(tok, eot):
    """texts -> the ids of each (a list), followed by `eot`: cut into pieces and encoded as data prepare does."""
    import llmcli.data.encode as encode_mod

    rule, pre, added = encode_mod.cut_rule(tok)
    encoder = encode_mod.BlockEncoder(tok.to_str(), eot, "uint32")

    def tokenize(texts):
        out = []
        for text in texts:
            pieces = list(encode_mod.stream_pieces([(text, True)], rule, pre, added))
            out.append(encoder([p for p, _ in pieces], [e for _, e in pieces]).ids.tolist())
        return out

    return tokenize


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_long_documents_are_encoded_in_pieces_with_identical_ids(tmp_path, monkeypatch, kind, cfg):
    import llmcli.data.encode as encode_mod
    from llmcli.tokenizer import encode

    lines = ["plain line", "trailing space ", "  leading", "", "'s contraction", "42 numbers 7",
             "\tTab", "ünïcödé 日本 😀", "x", "end."]
    doc = "\n".join(lines[i % len(lines)] + str(i % 3) * (i % 2) for i in range(400)) + "\n"
    path = tmp_path / "long.txt"
    path.write_text(doc)
    monkeypatch.setattr(encode_mod, "PIECE_CHARS", 40)
    assert len(encode_mod._pieces(doc, "any")) > 50
    prepared = prepare_data(cfg(f"data.source={path}", "data.val_fraction=0", f"tokenizer.kind={kind}",
                                "tokenizer.vocab_size=320", "tokenizer.min_frequency=1"),
                            console=Console(quiet=True))
    tok = load_tokenizer(prepared.tokenizer_path)
    assert np.asarray(prepared.tokens("train")).tolist() == encode(tok, doc) + [prepared.eot_id]


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("line", [
    "words on one very long line, with <|endoftext|> inside and punctuation!! 42 " * 40,
    "nowhitespaceatall,justlettersAND123digits;punct!?'s'tünïcödé<|endoftext|>日本" * 40,
])
def test_one_long_line_is_encoded_in_pieces_with_identical_ids(tmp_path, monkeypatch, kind, cfg, line):
    import llmcli.data.encode as encode_mod
    from llmcli.tokenizer import encode

    path = tmp_path / "line.txt"
    path.write_text(line)
    monkeypatch.setattr(encode_mod, "PIECE_CHARS", 50)
    prepared = prepare_data(cfg(f"data.source={path}", "data.val_fraction=0", f"tokenizer.kind={kind}",
                                "tokenizer.vocab_size=300", "tokenizer.min_frequency=1"),
                            console=Console(quiet=True))
    tok = load_tokenizer(prepared.tokenizer_path)
    rule = encode_mod._cut_rule(json.loads(tok.to_str()))
    assert len(encode_mod._pieces(line, rule, tok.pre_tokenizer, ["<|endoftext|>"])) > 20
    assert np.asarray(prepared.tokens("train")).tolist() == encode(tok, line) + [prepared.eot_id]


@pytest.mark.slow
def test_a_long_single_line_is_prepared_in_bounded_memory(tmp_path):
    """Peak memory of `data prepare` on a 6 MB text with no newline is about that of the same text
    in normal lines (it was ~275 bytes a character before pieces could end inside a line)."""
    import subprocess
    import sys

    words = "the quick brown fox jumps over the lazy dog and runs far away " * 16
    peaks = {}
    for name, sep in (("lines", "\n"), ("one-line", " ")):
        path = tmp_path / f"{name}.txt"
        path.write_text(sep.join([words] * 6_000))
        code = ("import resource, sys; from llmcli.cli import main; sys.argv = ['llmcli', 'data', 'prepare', "
                f"'data.source={path}', 'data.cache_dir={tmp_path / name}']\ntry: main()\nexcept SystemExit: pass\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[name] = int(out.stdout.strip().splitlines()[-1]) * 1024
    assert peaks["one-line"] < 1.3 * peaks["lines"] + 100e6, peaks


# Byte-level BPE through the chunk cache

NASTY = [
    "", " ", "\n", "  \t \r\n", "plain words, and more words.", "  leading and trailing  ",
    "tabs\tand\t\ttabs\t", "windows\r\nlines\r\n\r\nend\r\n", "it's I'll 'tis they've we'd 'S 's'",
    "digits 123 4567890 3.14 1,000", "punctuation!!! ... ?!?; -- (x) [y] {z} \"q\" ''",
    "accents: café naïve Ærø", "CJK: 日本語のテキスト", "emoji: 😀👍🏽 👨‍👩‍👧",
    "nbsp:\xa0a\xa0 b \xa0c\xa0", "separators\u2028here \u2029", "file\x1cseparator \x1c x\x1d\x1e\x1f",
    "end.\x1c\x1d next!\x1f? \x1e.", "a \xa0 b\xa0  c\u3000\t d",
    "odd\x0bvertical\x0cfeed \x85next", "wide\u3000space \u2003em",
    "special <|endoftext|> inside<|endoftext|>text <|endoftext|>", "<|endoftext|>",
]


def nasty_bpe():
    from llmcli.config import TokenizerConfig
    from llmcli.tokenizer import train_tokenizer

    return train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=1), NASTY * 3)


def pre_tokens(tok, *strings):
    return [piece for string in strings for piece, _ in tok.pre_tokenizer.pre_tokenize_str(string)]


def test_bpe_by_chunks_gives_the_ids_of_plain_encode(monkeypatch):
    import llmcli.data.encode as encode_mod
    from llmcli.tokenizer import encode, eot_id

    tok = nasty_bpe()
    assert encode_mod._by_chunks(json.loads(tok.to_str()))
    monkeypatch.setattr(encode_mod, "PIECE_CHARS", 30)  # long texts in pieces,
    monkeypatch.setattr(encode_mod, "CHUNK_GROUP_CHARS", 200)  # pieces in several groups,
    monkeypatch.setattr(encode_mod, "JOINED_CHUNKS", 3)  # several strings to the tokenizer,
    monkeypatch.setattr(encode_mod, "CACHED_CHUNKS", 40)  # and the cache starts over on the way
    docs = NASTY + ["\n".join(NASTY), " ".join(NASTY), "\n\n".join(NASTY * 3)]
    for text in docs:  # chunks cut nowhere inside a pre-token
        chunks = encode_mod._CHUNK.findall(text)
        assert "".join(chunks) == text
        assert pre_tokens(tok, *chunks) == pre_tokens(tok, text)
    want = [encode(tok, text) + [eot_id(tok)] for text in docs]
    tokenize = document_encoder(tok, eot_id(tok))
    for _ in range(2):  # the second time mostly from the cache
        assert tokenize(docs) == want


def test_prepared_plays_have_the_ids_of_plain_encode(tmp_path, shakespeare, cfg, texts):
    from llmcli.config import TokenizerConfig
    from llmcli.tokenizer import encode, save_tokenizer, train_tokenizer

    path = tmp_path / "bpe.json"
    save_tokenizer(train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=1000), texts(shakespeare, "val")), path)
    prepared = prepare_data(cfg(f"tokenizer.path={path}"), console=Console(quiet=True))
    tok = load_tokenizer(prepared.tokenizer_path)
    for split in ("val", "test"):  # four whole plays
        want = [i for play in texts(shakespeare, split) for i in encode(tok, play) + [prepared.eot_id]]
        assert np.asarray(prepared.tokens(split)).tolist() == want


@pytest.mark.parametrize("change, by_chunks", [
    ("added token with a space", False), ("lstrip added token", False), ("add_prefix_space", False),
    ("second added token", True),  # chunks, but each encoded on its own
])
def test_other_bpe_tokenizers_keep_the_ids_of_plain_encode(tmp_path, change, by_chunks, cfg):
    from tokenizers import AddedToken, pre_tokenizers

    import llmcli.data.encode as encode_mod
    from llmcli.tokenizer import encode, save_tokenizer

    tok = nasty_bpe()
    if change == "added token with a space":
        tok.add_tokens(["and more"])
    elif change == "lstrip added token":
        tok.add_special_tokens([AddedToken("<sep>", lstrip=True)])
    elif change == "add_prefix_space":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    else:
        tok.add_special_tokens(["<pad>"])
    assert encode_mod._by_chunks(json.loads(tok.to_str())) == by_chunks
    save_tokenizer(tok, tmp_path / "tok.json")
    doc = "\n".join(NASTY) + " and more <sep> words <pad>\n"
    (tmp_path / "doc.txt").write_text(doc, encoding="utf-8", newline="")
    prepared = prepare_data(cfg(f"data.source={tmp_path / 'doc.txt'}", "data.val_fraction=0",
                                f"tokenizer.path={tmp_path / 'tok.json'}"), console=Console(quiet=True))
    assert np.asarray(prepared.tokens("train")).tolist() == encode(tok, doc) + [prepared.eot_id]


def test_chunks_are_joined_only_by_a_separator_that_cannot_overlap():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import llmcli.data.encode as encode_mod
    from llmcli.tokenizer import encode

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    docs = ["plain aX words aX more aX", "aX aX", "x <|endoftext|> y"]
    tok.train_from_iterator(docs * 5, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["aXa"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    eot = tok.token_to_id("aXa")  # " aX" + "aXa" would match "aXa" one character early
    assert encode_mod._ChunkEncoder(tok, eot).separator is None
    assert document_encoder(tok, eot)(docs) == [encode(tok, text) + [eot] for text in docs]
