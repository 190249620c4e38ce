"""Sampling a token from logits, per row of a batch, with each row's own settings.

In this order: repetition penalty (CTRL: over every token of the prompt and the completion so far,
a positive logit is divided by the penalty, a negative one multiplied), then temperature (0 =
greedy: the arg-max, nothing else applies), top-k (keep the k most likely), top-p (keep the
smallest set of most likely tokens whose probabilities sum to at least p), min-p (drop tokens less
likely than min_p times the most likely one); each filter works on the distribution the previous
ones left. The token is drawn by inverse-CDF sampling with one uniform number per row.
"""

from __future__ import annotations

import math

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on the tokens marked in `seen` [B, V] (bool), per-row `penalty` [B]."""
    p = penalty[:, None].to(logits.dtype)
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalized, logits)


def sorted_filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor, min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k, top-p and min-p, sorted from most to least likely.

    logits [B, V] float; per-row settings [B] (temperature > 0; top_k 0 = off; top_p 1 = off).
    Returns (probs [B, V] in descending order, zeros for dropped tokens; order [B, V] token ids).
    Every filter keeps a prefix of the sorted tokens, and always the most likely one.
    """
    vocab = logits.shape[-1]
    scaled = logits.float() / temperature[:, None].float()
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    neg_inf = torch.tensor(-math.inf, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    sorted_logits = torch.where(ranks < k[:, None], sorted_logits, neg_inf)
    probs = sorted_logits.softmax(-1)
    # top-p: keep a token while the mass of the more likely tokens before it is still below p.
    before = probs.cumsum(-1) - probs
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1)
    keep[:, 0] = True
    sorted_logits = torch.where(keep, sorted_logits, neg_inf)
    probs = sorted_logits.softmax(-1)
    # min-p: relative to the most likely token, which is always kept.
    keep = probs >= min_p[:, None] * probs[:, :1]
    keep[:, 0] = True
    sorted_logits = torch.where(keep, sorted_logits, neg_inf)
    return sorted_logits.softmax(-1), order


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The distribution a token is drawn from, [B, V] in vocabulary order (for tests, logprobs)."""
    probs, order = sorted_filtered_probs(logits, temperature, top_k, top_p, min_p)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: arg-max where temperature == 0, else inverse-CDF with `uniforms` [B] in [0, 1)."""
    greedy_tokens = logits.argmax(-1)
    is_greedy = temperature <= 0
    if bool(is_greedy.all()):
        return greedy_tokens
    temperature = torch.where(is_greedy, torch.ones_like(temperature), temperature)
    probs, order = sorted_filtered_probs(logits, temperature, top_k, top_p, min_p)
    cdf = probs.cumsum(-1)
    target = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    rank = (cdf < target).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    sampled = order.gather(-1, rank).squeeze(-1)
    return torch.where(is_greedy, greedy_tokens, sampled)

