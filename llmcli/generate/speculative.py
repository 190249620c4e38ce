"""Speculative decoding: cheap proposals, verified by the target model in one forward.

A proposer guesses the next k tokens: a small draft model with the same tokenizer (sampling each
guess from its own distribution q), or prompt lookup (the continuation after the latest earlier
occurrence of the context's last n-gram: no model at all, a deterministic guess). The target then
scores the last token and the k guesses in one forward, which gives its distribution p at each of
the k + 1 positions, and the rules below decide which guesses to keep:

* greedy: keep the longest prefix of guesses equal to the target's arg-max, then add the target's
  own arg-max after it: exactly the tokens plain greedy decoding would give;
* sampling (Leviathan et al. 2023, Chen et al. 2023): keep guess x_i with probability
  min(1, p_i(x_i) / q_i(x_i)); at the first rejection draw from norm(max(0, p_i - q_i)) instead and
  stop; when every guess is kept, draw a bonus token from p_k. Each emitted token is then
  distributed exactly as p. A deterministic proposer is the case q_i = one-hot(x_i).

p and q are the distributions after the request's temperature, top-k, top-p and min-p, so the
emitted tokens follow what plain sampling draws from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lookup_proposal(tokens: Sequence[int], k: int, max_ngram: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the context's last n-gram,
    trying n = max_ngram first, down to 1; [] when no n-gram recurs."""
    tokens = list(tokens)
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from the distribution `probs` [V] (inverse CDF, one uniform from `generator`)."""
    cdf = probs.double().cumsum(0)
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cdf[-1])
    return int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True).clamp(max=len(probs) - 1))


def greedy_accept(proposal: Sequence[int], target_argmax: Sequence[int]) -> list[int]:
    """The tokens to emit: the guesses the target's arg-max agrees with, then its own next token
    (`target_argmax` has one more entry than `proposal`)."""
    n = 0
    while n < len(proposal) and proposal[n] == target_argmax[n]:
        n += 1
    return [*proposal[:n], int(target_argmax[n])]


def rejection_accept(proposal: Sequence[int], p: torch.Tensor, q: torch.Tensor | None,
                     generator: torch.Generator) -> list[int]:
    """The tokens to emit under the rejection rule (module docstring).

    p [k + 1, V]: the target's distributions after each prefix; q [k, V]: the proposer's, or None
    for a deterministic proposer (one-hot at each guess).
    """
    out: list[int] = []
    for i, token in enumerate(proposal):
        q_token = 1.0 if q is None else float(q[i, token])
        ratio = float(p[i, token]) / q_token if q_token > 0 else 0.0
        if float(torch.rand((), generator=generator, dtype=torch.float64)) < min(1.0, ratio):
            out.append(int(token))
            continue
        residual = residual_distribution(p[i], q[i] if q is not None else None, token)
        return [*out, draw(residual, generator)]
    return [*out, draw(p[len(proposal)], generator)]


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """norm(max(0, p - q)) after a rejected guess `token` (q None: one-hot at it). Rejection has
    probability zero when the residual would be all zeros, but rounding can get there: then p."""
    if q is None:
        q = torch.zeros_like(p)
        q[token] = 1.0
    residual = (p - q).clamp(min=0)
    total = float(residual.sum())
    return residual / total if total > 0 else p
