"""Instruction and chat data (`data.format`: alpaca, chat), rendered through the model's chat template.

* alpaca: a `.json` file holding a list of records, or `.jsonl` with one record per line; each has
  `instruction` and `output` and an optional `input` (strings). It becomes the conversation user =
  instruction (+ a blank line + input), assistant = output.
* chat: `.jsonl` (or a `.json` list) of records with `messages`: [{role, content}], roles system,
  user and assistant, at least one assistant message.

An example is rendered through the chat template of the tokenizer it is trained with (a
checkpoint's tokenizer_config.json beside `tokenizer.path`, else the default layout; see
chat_template.py) as segments: what the template adds for each assistant message after the
generation prompt (its end-of-turn marker included) is a response; all the rest is prompt. Its
tokens are each segment's tokens laid end to end, then <|endoftext|>, which is a response token
too (the model learns to stop). With `data.mask_prompt` (default) only response tokens carry loss.
Examples are split by `data.val_fraction` / `test_fraction`, whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmcli.chat_template import ChatTemplate, JinjaTemplate, load_chat_template
from llmcli.config import Config
from llmcli.data.shards import write_stream
from llmcli.data.sources import resolve_files
from llmcli.data.split import SPLITS, split_indices
from llmcli.errors import UserError

if TYPE_CHECKING:
    import datasets

ROLES = ("system", "user", "assistant")
Messages = list[tuple[str, str]]


def chat_template_for(cfg: Config) -> ChatTemplate | JinjaTemplate:
    """The template examples are rendered with: the one beside `tokenizer.path`, or the default."""
    directory = Path(cfg.tokenizer.path).expanduser().parent if cfg.tokenizer.path else None
    return load_chat_template(None, directory)


def cache_part(cfg: Config) -> dict[str, Any]:
    """What an example corpus adds to the prepared data's cache key."""
    template = chat_template_for(cfg)
    source = getattr(template, "source", None) or repr(template)
    return {"format": cfg.data.format, "mask_prompt": cfg.data.mask_prompt,
            "template": hashlib.sha256(source.encode()).hexdigest()}


# --------------------------------------------------------------------------------------------
# Reading records


def _records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) for each record of a .json list or a .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(value, list):
            raise UserError(f"{path}: expected a JSON list of records")
        return [(f"{path} record {i + 1}", record) for i, record in enumerate(value)]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
    return out


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = f"missing {key!r}" if value is None else f"{key!r} must be a string; got {value!r}"
        raise UserError(f"{where}: {problem}")
    return value


def alpaca_messages(record: Any, where: str) -> Messages:
    """An Alpaca record as a conversation."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: an alpaca record is an object with instruction, input and output")
    instruction, extra = _text(record, "instruction", where), _text(record, "input", where, required=False)
    output = _text(record, "output", where)
    return [("user", f"{instruction}\n\n{extra}" if extra.strip() else instruction), ("assistant", output)]


def chat_messages(record: Any, where: str) -> Messages:
    """A chat record's messages, checked: known roles, string contents, an assistant turn."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: a chat record is an object with a non-empty list 'messages'")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: messages[{i}] must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{where}: messages[{i}] has role {role!r}; roles are {', '.join(ROLES)}")
        out.append((role, _text(message, "content", f"{where}: messages[{i}]")))
    if not any(role == "assistant" for role, _ in out):
        raise UserError(f"{where}: no assistant message to learn from")
    return out


def read_examples(cfg: Config) -> list[Messages]:
    """Every conversation in the `.json` / `.jsonl` files `data.source` names."""
    files = resolve_files(cfg.data.source)
    other = [p for p in files if p.suffix.lower() not in (".json", ".jsonl")]
    if other:
        raise UserError(f"data.format={cfg.data.format} reads .json and .jsonl files; {other[0]} is neither")
    parse = alpaca_messages if cfg.data.format == "alpaca" else chat_messages
    examples = [parse(record, where) for path in files for where, record in _records(path)]
    if not examples:
        raise UserError(f"data.source: {cfg.data.source} holds no records")
    return examples


# --------------------------------------------------------------------------------------------
# Rendering and tokenizing


def segments(template: ChatTemplate | JinjaTemplate, messages: Messages) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_response) pieces (see the module docstring)."""
    out, done = [], ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prompt, upto = template.render(messages[:i], True), template.render(messages[: i + 1], False)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise UserError("the chat template does not render a conversation as the prompt of its next "
                            f"reply followed by that reply (message {i + 1}); it cannot mark responses")
        out += [(prompt[len(done):], False), (upto[len(prompt):], True)]
        done = upto
    tail = template.render(messages, False)[len(done):]
    return [piece for piece in [*out, (tail, False)] if piece[0]]


def load_examples(cfg: Config) -> datasets.DatasetDict:
    """The rendered examples, split: columns `text` (whole) and `segments` (text, loss)."""
    import datasets

    template = chat_template_for(cfg)
    examples = read_examples(cfg)
    order = split_indices(len(examples), cfg.data)
    features = datasets.Features({"text": datasets.Value("string"), "segments": datasets.List(
        {"text": datasets.Value("string"), "loss": datasets.Value("bool")})})
    out = {}
    for split in SPLITS:
        if order.get(split) or split == "train":
            rows = [segments(template, examples[i]) for i in order[split]]
            out[split] = datasets.Dataset.from_dict(
                {"text": ["".join(t for t, _ in row) for row in rows],
                 "segments": [[{"text": t, "loss": loss} for t, loss in row] for row in rows]}, features=features)
    return datasets.DatasetDict(out)


def write_examples(ds: datasets.Dataset, tok: Any, eot: int, dtype: np.dtype, directory: Path, split: str,
                   mask_prompt: bool) -> tuple[dict[str, int], dict[str, list[list]]]:
    """The shards of `<split>` (ids) and `<split>-mask` (1 = carries loss), `<split>-starts.npy`; the
    stats and the streams' index entries."""
    ids, mask, starts = [], [], []
    position = 0
    for row in ds["segments"]:
        starts.append(position)
        for piece in row:
            piece_ids = tok.encode(piece["text"], add_special_tokens=False).ids
            ids += piece_ids
            mask += [piece["loss"] or not mask_prompt] * len(piece_ids)
        ids.append(eot)
        mask.append(True)
        position = len(ids)
    streams = {split: write_stream(directory, split, np.asarray(ids, dtype=dtype), dtype),
               f"{split}-mask": write_stream(directory, f"{split}-mask", np.asarray(mask, dtype=np.uint8),
                                             np.dtype(np.uint8))}
    np.save(directory / f"{split}-starts.npy", np.asarray(starts, dtype=np.int64))
    texts = ds["text"]
    return {"documents": len(ds), "characters": sum(map(len, texts)), "bytes": sum(len(t.encode("utf-8")) for t in texts),
            "tokens": len(ids), "loss_tokens": int(sum(mask))}, streams
