"""Text on top of the engine: stop strings, incremental decoding, the Generator."""

from __future__ import annotations

import pytest

from llmcli.config import TokenizerConfig
from llmcli.errors import UserError
from llmcli.generate.text import Generator, IncrementalDecoder, StopText
from llmcli.options.sampling import SamplingParams
from llmcli.tokenizer import decode, encode, train_tokenizer


def test_stop_text_cuts_exactly_and_holds_back_possible_prefixes():
    s = StopText(["END", "\n\n"])
    assert s.push("hello E") == "hello "  # "E" may start END
    assert s.push("N") == ""
    assert s.push("X more") == "ENX more"
    assert s.push(" \n") == " "
    assert s.push("\nafter") == ""
    assert s.stopped and s.text == "hello ENX more "
    s = StopText(["abc", "bc"])
    assert s.push("xab") == "x"
    assert s.push("c") == ""  # both match; the earlier occurrence wins
    assert s.text == "x"
    s = StopText(["zz"])
    assert s.push("az") == "a" and s.push("", final=True) == "z" and not s.stopped


def test_incremental_decoding_never_splits_a_character():
    text = "naïve café 😀 — ünïcödé ✓ " * 4
    bpe = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=280, min_frequency=2), [text])
    ids = encode(bpe, text)
    assert len(ids) > len(text.encode()) // 4  # many characters span several tokens
    decoder = IncrementalDecoder(bpe)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text == decode(bpe, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # something had to wait for its last byte


def test_generator_stop_strings_cut_across_tokens(make_model, char_tokenizer):
    tok = char_tokenizer
    gen = Generator(make_model(tok.get_vocab_size()), tok, max_batch_size=2)
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eot=True)
    (free,) = gen.generate(["ROMEO:"], params)
    assert len(free.completion) >= 20 and free.finish_reason == "length"
    stop = free.completion[10:13]  # three char tokens
    (cut,) = gen.generate(["ROMEO:"], SamplingParams(max_new_tokens=40, temperature=0, ignore_eot=True,
                                                     stop=(stop,)))
    assert cut.completion == free.completion[:free.completion.index(stop)]
    assert cut.finish_reason == "stop" and cut.tokens == free.completion.index(stop) + 3


def test_generator_streams_the_same_text_it_returns(make_model, char_tokenizer):
    tok = char_tokenizer
    gen = Generator(make_model(tok.get_vocab_size(), block_size=16), tok, max_batch_size=3)
    streamed: dict[int, str] = {}
    results = gen.generate(["All:", "", "Speak"], SamplingParams(max_new_tokens=40, temperature=1.0, seed=3),
                           on_event=lambda ev: streamed.__setitem__(ev.id, streamed.get(ev.id, "") + ev.text))
    for r in results:
        assert streamed.get(r.id, "") == r.completion
        assert "<|endoftext|>" not in r.completion


def test_a_prompt_as_token_ids_generates_what_its_text_does(make_model, char_tokenizer):
    tok = char_tokenizer
    gen = Generator(make_model(tok.get_vocab_size()), tok)
    params = SamplingParams(max_new_tokens=20, temperature=0)
    (as_text,) = gen.generate(["ROMEO:"], params)
    (as_ids,) = gen.generate([encode(tok, "ROMEO:")], params)
    assert as_ids.completion == as_text.completion and as_ids.prompt_tokens == 6


def test_unseen_characters_and_bad_params_are_user_errors(make_model, char_tokenizer):
    tok = char_tokenizer
    gen = Generator(make_model(tok.get_vocab_size()), tok)
    with pytest.raises(UserError, match=r"3 character\(s\) .* never saw: '#' '1' 'Z'"):
        gen.submit("Zap #1 ROMEO")
    with pytest.raises(UserError, match="temperature"):
        gen.submit("ROMEO", SamplingParams(temperature=-1))
    with pytest.raises(UserError, match="top_p must be in"):
        SamplingParams(top_p=0)
