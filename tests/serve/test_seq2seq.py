"""Serving a sequence-to-sequence model: the prompt is the source; a chat's last user message is."""

from __future__ import annotations

import pytest

from llmcli.generate.text import Generator
from llmcli.load import load_checkpoint
from llmcli.options.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture
def seq2seq_server(seq2seq_runs, start_server):
    loaded = load_checkpoint(seq2seq_runs["encoder-decoder"])
    model, tokenizer, source_tokenizer = loaded.model, loaded.tokenizer, loaded.source_tokenizer
    return start_server(model, tokenizer, source_tokenizer=source_tokenizer, max_batch_size=2), (model, tokenizer,
                                                                                                 source_tokenizer)


def _alone(model, tokenizer, source_tokenizer, source: str) -> str:
    generator = Generator(model, tokenizer, max_batch_size=1, source_tokenizer=source_tokenizer)
    request = generator.submit(source, SamplingParams(max_new_tokens=12, temperature=0))
    while generator.has_work():
        generator.step()
    return generator.completion(request).completion


def test_completions_and_chat_decode_the_source(seq2seq_server):
    server, loaded = seq2seq_server
    client = server.client()
    sources = ["abc", "hgfe", "dd"]
    expected = [_alone(*loaded, s) for s in sources]
    got = client.completions.create(model=server.model, prompt=sources, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected
    chat = client.chat.completions.create(model=server.model, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "ignored"}, {"role": "user", "content": "zzz"},
        {"role": "assistant", "content": "Z"}, {"role": "user", "content": "hgfe"}])
    assert chat.choices[0].message.content == expected[1]


def test_bad_sources_are_400s(seq2seq_server):
    server, _ = seq2seq_server
    long = server.post("/v1/completions", {"model": server.model, "prompt": "abcdefgh" * 3, "max_tokens": 2})
    assert long.status_code == 400 and "encoder takes at most" in long.json()["error"]["message"]
    no_user = server.post("/v1/chat/completions", {"model": server.model, "messages": [
        {"role": "system", "content": "hi"}]})
    assert no_user.status_code == 400 and "needs a user message" in no_user.json()["error"]["message"]
