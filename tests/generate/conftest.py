"""Generation fixtures: random models with large weights (logits far from ties) and an engine runner."""

from __future__ import annotations

import contextlib

import pytest
import torch

from llmcli.generate.engine import Engine


@pytest.fixture
def make_model(tiny_model):
    def make(vocab: int, *, preset: str = "gpt2", block_size: int = 96, seed: int = 0, std: float = 0.15, **extra):
        return tiny_model(vocab, preset=preset, block_size=block_size, seed=seed, std=std, **extra)

    return make


@pytest.fixture
def run_engine():
    """run_engine(model, prompts, params, batch_size=, add_later={step: [(prompt, params)]}, sources=,
    **engine options): the tokens each request generated (in order), and the engine."""

    def run(model, prompts, params, *, batch_size, add_later=None, sources=None, **options):
        engine = Engine(model, max_batch_size=batch_size, **options)
        sources = sources or [None] * len(prompts)
        ids = [engine.add(p, sp, source_ids=src) for p, sp, src in zip(prompts, params, sources, strict=True)]
        out: dict[int, list[int]] = {}
        step = 0
        while engine.has_work() or (add_later and any(s >= step for s in add_later)):
            for prompt, sp in (add_later or {}).get(step, []):
                ids.append(engine.add(prompt, sp))
            for ev in engine.step():
                out.setdefault(ev.id, []).append(ev.token)
            step += 1
        return [out[i] for i in ids], engine

    return run


@pytest.fixture
def last_logits():
    """`with last_logits(model) as seen:` fills `seen`, per forward call, with row 0's logits at its
    last position (what the engine samples from when one request runs)."""

    @contextlib.contextmanager
    def watch(model):
        seen: list[torch.Tensor] = []
        hook = model.register_forward_hook(lambda module, args, output: seen.append(output[0, -1].clone()))
        try:
            yield seen
        finally:
            hook.remove()

    return watch
