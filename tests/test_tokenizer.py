import random

import pytest
from tokenizers import Tokenizer, models

from llmcli.config import TokenizerConfig
from llmcli.errors import UserError
from llmcli.tokenizer import (
    EOT,
    UNK,
    decode,
    encode,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    unknown_chars,
)

TRAIN = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\r\n\tSpeak, speak.  Leading spaces and\ttabs\n\n\n",
]

UNICODE = [
    "  leading spaces, trailing spaces  ",
    "line one\r\nline two\rline three\n\n\ttabbed\x0bvertical\x0cfeed",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇬🇧",
    "CJK 日本語のテキスト 中文 한국어",
    "combining e\u0301 a\u0308\u0323 and precomposed é ä",
    "rtl עברית العربية, zero width \u200b\u200c\u200d, bom \ufeff, nbsp \u00a0",
    "\x00 control \x1f bytes \x7f and the replacement char \ufffd",
    "",
]


def char_tok():
    return train_tokenizer(TokenizerConfig(kind="char"), TRAIN)


def bpe_tok(vocab_size=300, min_frequency=1):
    return train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=vocab_size, min_frequency=min_frequency),
                           TRAIN * 20)


def word_tok(vocab_size=12, min_frequency=1):
    return train_tokenizer(TokenizerConfig(kind="word", vocab_size=vocab_size, min_frequency=min_frequency), TRAIN * 3)


def random_unicode(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        while True:
            cp = rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0x800),
                             rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000),
                             rng.choice([9, 10, 13, 32])])
            if not 0xD800 <= cp <= 0xDFFF:  # surrogates are not valid in UTF-8
                break
        out.append(chr(cp))
    return "".join(out)


def test_char_round_trips_whitespace_exactly():
    tok = char_tok()
    for text in TRAIN + ["  speak\r\n\t\tFirst  ", "\n\n\n", ""]:
        ids = encode(tok, text)
        assert len(ids) == len(text)  # one token per character
        assert decode(tok, ids) == text


def test_char_ids_are_sorted_characters_after_specials():
    tok = char_tok()
    chars = sorted(set("".join(TRAIN)))
    assert tok.token_to_id(EOT) == eot_id(tok) == 0
    assert tok.token_to_id(UNK) == 1
    assert [tok.token_to_id(c) for c in chars] == list(range(2, 2 + len(chars)))
    assert tok.get_vocab_size() == len(chars) + 2
    # The same texts in another order, or as a one-shot generator, give the same tokenizer.
    again = train_tokenizer(TokenizerConfig(kind="char"), (t for t in reversed(TRAIN)))
    assert again.get_vocab() == tok.get_vocab()


def test_char_unknown_characters_map_to_unk():
    tok = char_tok()
    text = "Speak, Zoë! 😀 speak"
    assert unknown_chars(tok, text) == ["!", "Z", "ë", "😀"]
    assert unknown_chars(tok, text) == sorted(set(text) - set("".join(TRAIN)))
    ids = encode(tok, text)
    assert ids.count(1) == 4
    assert decode(tok, ids) == "Speak, <unk>o<unk><unk> <unk> speak"
    assert unknown_chars(tok, "speak") == []


def test_eot_is_special_and_decodes_back():
    for tok in (char_tok(), bpe_tok()):
        ids = encode(tok, f"speak{EOT}hear")
        assert ids.count(eot_id(tok)) == 1
        assert decode(tok, ids) == f"speak{EOT}hear"
        assert decode(tok, ids, skip_special_tokens=True) == "speakhear"


def test_bpe_round_trips_any_unicode():
    tok = bpe_tok()
    rng = random.Random(0)
    texts = UNICODE + [random_unicode(rng, rng.randrange(1, 200)) for _ in range(200)]
    for text in texts:
        assert decode(tok, encode(tok, text)) == text, repr(text)
        assert unknown_chars(tok, text) == []


def test_bpe_vocab_size_and_determinism():
    tok = bpe_tok(vocab_size=300)
    assert tok.get_vocab_size() == 300
    assert eot_id(tok) == 0
    assert bpe_tok(vocab_size=300).get_vocab() == tok.get_vocab()
    # Merges make common text shorter than its bytes.
    text = TRAIN[0]
    assert len(encode(tok, text)) < len(text.encode())


def test_bpe_vocab_too_small():
    with pytest.raises(UserError, match=r"tokenizer\.vocab_size=100 .*minimum is 257"):
        bpe_tok(vocab_size=100)
    assert bpe_tok(vocab_size=257).get_vocab_size() == 257


def test_word_vocabulary_is_the_most_frequent_words_after_specials():
    tok = word_tok(vocab_size=6)
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(UNK) == 1 and tok.get_vocab_size() == 6 + 2
    # The most frequent pieces of TRAIN: "\n", ",", ".", ":" and "speak", then words seen once, ties
    # in byte order: "All" first.
    assert set(tok.get_vocab()) == {EOT, UNK, "\n", ",", ".", ":", "speak", "All"}
    assert word_tok(vocab_size=6).get_vocab() == tok.get_vocab()  # deterministic
    # TRAIN * 3: the once-seen words occur 3 times
    assert set(word_tok(vocab_size=100, min_frequency=4).get_vocab()) == {EOT, UNK, "\n", ",", ".", ":", "speak"}


def test_word_pieces_and_decoding_up_to_spacing():
    tok = word_tok(vocab_size=100)
    text = "All:\r\n\tSpeak, speak.  Leading spaces\n\nFirst Citizen:"
    pieces = [tok.id_to_token(i) for i in encode(tok, text)]
    assert pieces == ["All", ":", "\n", "Speak", ",", "speak", ".", "Leading", "spaces", "\n", "\n", "First",
                      "Citizen", ":"]  # "\r" and "\t" are spaces: dropped
    assert decode(tok, encode(tok, text)) == "All:\nSpeak, speak. Leading spaces\n\nFirst Citizen:"
    ids = encode(tok, f"speak{EOT}hear Zounds")
    assert ids.count(0) == 1 and decode(tok, ids) == f"speak {EOT} hear {UNK}"
    assert unknown_chars(tok, "Speak, Zounds! hear me, Zounds") == ["!", "Zounds"]


def test_save_and_load(tmp_path):
    for tok in (char_tok(), bpe_tok()):
        path = tmp_path / "sub" / "tokenizer.json"
        save_tokenizer(tok, path)
        loaded = load_tokenizer(path)
        assert Tokenizer.from_file(str(path)).get_vocab() == tok.get_vocab()
        for text in TRAIN:
            assert encode(loaded, text) == encode(tok, text)
            assert decode(loaded, encode(loaded, text)) == text
        assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp files left


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match="not found: .*nope.json"):
        load_tokenizer(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_eot_id_missing():
    tok = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(UserError, match="no <\\|endoftext\\|> token"):
        eot_id(tok)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_transformers_fast_tokenizer_agrees(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    tok = char_tok() if kind == "char" else bpe_tok()
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    texts = TRAIN + [f"speak{EOT}First"] + (UNICODE if kind == "bpe" else [])
    for text in texts:
        ids = encode(tok, text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == decode(tok, ids) == text
    assert len(hf) == tok.get_vocab_size()


def test_transformers_fast_tokenizer_agrees_on_words(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = word_tok(vocab_size=100)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in TRAIN + [f"speak{EOT}First Zounds"]:
        ids = encode(tok, text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == decode(tok, ids)
