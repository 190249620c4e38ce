"""The engine's tokens equal those of the engine before the scheduler/runner split, for every family.

`previous_engine.json` holds what the previous engine (commit 58c85f7, `generate/engine.py` before
issue 29) generated for the cases below: greedy and seeded sampling, three prompts through two
slots (so one joins midway), a slot and a paged cache. It was recorded by running this file as a
script against a checkout of that commit:

    python tests/generate/test_previous_engine.py PATH/TO/THAT/CHECKOUT

The models are the tiny random ones of tests/conftest.py, built the same way here, so that the
recording needs nothing of this branch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

EXPECTED = Path(__file__).with_name("previous_engine.json")
# (case name, model.arch, preset, paged): every family of the registry, the transformer in both presets.
CASES = [("gpt2", "transformer", "gpt2", False), ("llama", "transformer", "llama", False),
         ("llama paged", "transformer", "llama", True), ("lstm", "lstm", None, False), ("gru", "gru", None, False),
         ("rnn", "rnn", None, False), ("encoder-decoder", "encoder-decoder", None, False),
         ("encoder-decoder paged", "encoder-decoder", None, True), ("gru-seq2seq", "gru-seq2seq", None, False),
         ("lstm-seq2seq", "lstm-seq2seq", None, False)]
VOCAB, SOURCE_VOCAB = 40, 30


def build(arch: str, preset: str | None):
    """The case's model, as conftest's tiny_model / tiny_recurrent / tiny_seq2seq build it (std 0.3)."""
    from llmcli.config import PRESETS, ModelConfig
    from llmcli.models.registry import build_model

    if arch == "transformer":
        fields = dict(PRESETS[preset], preset=preset, n_layer=2, n_head=4, d_model=32, block_size=24,
                      vocab_size=VOCAB)
    elif arch in ("lstm", "gru", "rnn"):
        fields = dict(arch=arch, n_layer=2, d_model=32, block_size=32, vocab_size=VOCAB)
    else:
        fields = dict(arch=arch, n_layer=2, d_model=32, block_size=24, source_block_size=20, vocab_size=VOCAB,
                      src_vocab_size=SOURCE_VOCAB)
        if arch == "encoder-decoder":
            fields.update(n_head=4, pos="sinusoidal", act="relu")
    torch.manual_seed(0)
    model = build_model(ModelConfig(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


def generate(engine_class, arch: str, preset: str | None, paged: bool) -> dict[str, list[list[int]]]:
    """Greedy and seeded-sampled tokens of three requests (lengths 3, 30 (past the window), 9) in two slots."""
    from llmcli.options.sampling import SamplingParams

    model = build(arch, preset)
    seq2seq = model.task == "seq2seq"
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=rng).tolist() for n in (3, 30, 9)]
    sources = [torch.randint(0, SOURCE_VOCAB, (n,), generator=rng).tolist() + [1] for n in (4, 11, 7)]
    out = {}
    for mode, params in (("greedy", [SamplingParams(max_new_tokens=n, temperature=0) for n in (20, 40, 12)]),
                         ("seeded", [SamplingParams(max_new_tokens=30, temperature=1.0, top_k=10, seed=s)
                                     for s in range(3)])):
        engine = engine_class(model, max_batch_size=2, **({"kv_blocks": 10, "block_len": 4} if paged else {}))
        ids = [engine.add([0] if seq2seq else prompt, sp, source_ids=source if seq2seq else None)
               for prompt, source, sp in zip(prompts, sources, params, strict=True)]
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        while engine.has_work():
            for event in engine.step():
                tokens[event.id].append(event.token)
        out[mode] = [tokens[i] for i in ids]
    return out


@pytest.mark.parametrize("name, arch, preset, paged", CASES, ids=[c[0] for c in CASES])
def test_tokens_equal_the_previous_engines(name, arch, preset, paged):
    from llmcli.generate.engine import Engine

    assert generate(Engine, arch, preset, paged) == json.loads(EXPECTED.read_text())[name]


def test_every_family_is_covered():
    from llmcli.models.registry import FAMILIES

    assert {arch for _, arch, _, _ in CASES} == set(FAMILIES)


if __name__ == "__main__":  # record: python tests/generate/test_previous_engine.py CHECKOUT
    sys.path.insert(0, sys.argv[1])
    from llmcli.generate.engine import Engine as PreviousEngine

    torch.set_num_threads(1)
    recorded = {name: generate(PreviousEngine, arch, preset, paged) for name, arch, preset, paged in CASES}
    EXPECTED.write_text(json.dumps(recorded, indent=1) + "\n")
