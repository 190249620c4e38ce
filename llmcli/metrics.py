"""Scores of decoded sequences against references: exact match, PER, WER, BLEU and chrF.

Every source has one or more references (a word's alternative pronunciations); an output is
correct when it equals any of them after whitespace is normalised. For `outputs[i]` and
`references[i]`:

* exact match: the share of sources whose output is correct;
* WER (word error rate, G2P's convention where each source is one word): the share of sources
  whose output is not correct, i.e. 1 - exact match;
* PER (phoneme, or more generally token, error rate): the edit distance (insertions, deletions,
  substitutions, each costing 1) between the output's tokens and the closest reference's, summed
  over sources, divided by the summed length of those closest references;
* BLEU and chrF: sacrebleu's corpus scores (0-100) with every reference of each source.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence


def edit_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Levenshtein distance between two sequences (unit costs)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def normalise(text: str) -> str:
    return " ".join(text.split())


def sequence_scores(outputs: Sequence[str], references: Sequence[Sequence[str]],
                    tokens: Callable[[str], Sequence[Hashable]] = str.split) -> dict[str, float]:
    """exact_match, wer, per (fractions), bleu and chrf (0-100), and the counts behind them;
    `tokens` cuts a text into the units PER counts (default: whitespace-separated words)."""
    if len(outputs) != len(references) or not outputs:
        raise ValueError("one output per source, and at least one source")
    correct = edits = length = 0
    for output, refs in zip(outputs, references, strict=True):
        if not refs:
            raise ValueError("every source needs at least one reference")
        correct += normalise(output) in {normalise(r) for r in refs}
        hyp = list(tokens(output))
        distance, size = min((edit_distance(hyp, list(tokens(r))), len(list(tokens(r)))) for r in refs)
        edits, length = edits + distance, length + size
    bleu, chrf = _sacrebleu(outputs, references)
    exact = correct / len(outputs)
    return {"exact_match": exact, "wer": 1.0 - exact, "per": edits / max(length, 1), "bleu": bleu, "chrf": chrf,
            "sources": len(outputs), "correct": correct, "edits": edits, "reference_tokens": length}


def _sacrebleu(outputs: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Corpus BLEU and chrF; sources with fewer references fill the missing streams with None."""
    import sacrebleu

    streams = max(len(r) for r in references)
    refs = [[r[k] if k < len(r) else None for r in references] for k in range(streams)]
    return sacrebleu.corpus_bleu(list(outputs), refs).score, sacrebleu.corpus_chrf(list(outputs), refs).score
