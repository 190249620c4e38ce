"""`llmcli attention`: a model's attention weights on a text, from one real forward pass.

The model computes the weights itself (`LanguageModel.attention_maps`: the same forward, with
each attention layer run step by step so its softmax is kept). This module turns the text into
tokens (and, with --generate, greedily continues it), selects layers and heads, and hands the
maps to a picture, a shaded terminal view, or JSON. Each map names the token sequences along its
axes, so an encoder-decoder's cross-attention (generated target tokens over the source text) is
drawn like any other map; a family without attention refuses through the same interface.

For a sequence-to-sequence model TEXT is the source, and the target is the model's own greedy
output (up to its end token, or N tokens with --generate N): the maps are those of one teacher-
forced forward over that target, so each cross-attention row is the step that produced its token.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

import numpy as np
import torch

from llmcli import ui
from llmcli.device import configure_threads, select_device
from llmcli.errors import FieldError, UserError
from llmcli.insight import figures, heatmap
from llmcli.insight.heatmap import Panel
from llmcli.load import load_checkpoint
from llmcli.models.base import AttentionMap, LanguageModel
from llmcli.options.insight import AttentionOptions
from llmcli.options.sampling import SamplingParams

TERMINAL_MAX_TOKENS = 32  # beyond this a shaded terminal view no longer fits a screen's width


def attention_command(opts: AttentionOptions) -> None:
    out = figures.check_out(opts.out) if opts.out is not None else None
    configure_threads(opts.threads)
    device = select_device(opts.device)
    loaded = load_checkpoint(opts.run_dir, device, torch.float32)
    directory = loaded.directory
    tokens, maps = run_attention(loaded.model, loaded.tokenizer, opts.text, opts.generate, loaded.source_tokenizer)
    panels = select(maps, tokens, opts.layer, opts.head, opts.aggregate)
    if opts.json_out:
        print_json(maps, tokens, panels, opts)
    if out is not None:
        heatmap.draw(panels, out, title=f"{directory}: {_summary(tokens)}")
        ui.log(f"wrote {out} ({len(panels)} map{'s' if len(panels) != 1 else ''}, {_summary(tokens)})")
    elif not opts.json_out:
        longest = max(max(len(p.queries), len(p.keys)) for p in panels)
        if longest > TERMINAL_MAX_TOKENS:
            raise UserError(f"{longest} tokens are too many for the terminal view (at most "
                            f"{TERMINAL_MAX_TOKENS}); pass --out attention.png or --json")
        heatmap.show(panels, ui.stdout)


def run_attention(model: LanguageModel, tokenizer: Any, text: str, generate: int = 0,
                  source_tokenizer: Any = None) -> tuple[dict[str, list[str]], list[AttentionMap]]:
    """The tokens of `text` (and of `generate` greedy tokens after it) and the model's maps."""
    from llmcli.generate.text import encode_prompt

    if text == "":
        raise FieldError("text", "is empty: give some text to attend over")
    if model.task == "seq2seq":
        return _seq2seq_attention(model, tokenizer, source_tokenizer or tokenizer, text, generate)
    ids = encode_prompt(tokenizer, text)
    limit = model.context_length
    if limit is not None and len(ids) + generate > limit:
        extra = f" + {generate} to generate" if generate else ""
        raise UserError(f"TEXT is {len(ids)} tokens{extra}, more than the model's context of {limit}; "
                        "shorten it")
    generated = _greedy(model, tokenizer, ids, generate) if generate else []
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)
    extra = torch.tensor([generated], device=device) if generated else None
    maps = model.attention_maps(idx, extra)
    tokens = {"text": _pieces(tokenizer, ids), "generated": _pieces(tokenizer, generated)}
    return tokens, maps


def _seq2seq_attention(model: LanguageModel, tokenizer: Any, source_tokenizer: Any, text: str,
                       generate: int) -> tuple[dict[str, list[str]], list[AttentionMap]]:
    """TEXT as the source, the model's greedy target (see the module docstring), and the maps."""
    from llmcli.generate.text import encode_source
    from llmcli.tokenizer import eot_id

    source = encode_source(source_tokenizer, text)
    limit = model.context_length or model.config.block_size
    if generate > limit:
        raise FieldError("generate", f"{generate} is more than the {limit} target tokens the model takes")
    target = _greedy(model, tokenizer, source, generate or limit, source_tokenizer)
    inputs = [eot_id(tokenizer), *target[:-1]]  # the decoder starts from <|endoftext|>
    device = next(model.parameters()).device
    maps = model.attention_maps(torch.tensor([source], device=device), torch.tensor([inputs], device=device))
    tokens = {"text": _pieces(source_tokenizer, source), "generated": _pieces(tokenizer, target),
              "decoder input": _pieces(tokenizer, inputs)}
    return tokens, maps


def _greedy(model: LanguageModel, tokenizer: Any, ids: list[int], count: int, source_tokenizer: Any = None) -> list[int]:
    """Up to `count` greedy tokens after `ids` (for seq2seq: for the source `ids`), fewer if
    <|endoftext|> comes first (kept)."""
    from llmcli.generate.text import Generator

    generator = Generator(model, tokenizer, max_batch_size=1, source_tokenizer=source_tokenizer)
    generator.submit(ids, SamplingParams(max_new_tokens=count, temperature=0.0))
    out: list[int] = []
    while generator.has_work():
        out += [event.token for event in generator.step()]
    return out


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _summary(tokens: dict[str, list[str]]) -> str:
    text, generated = len(tokens["text"]), len(tokens["generated"])
    return f"{text} tokens" + (f" + {generated} generated" if generated else "")


def select(maps: list[AttentionMap], tokens: dict[str, list[str]], layer: int | None, head: int | None,
           aggregate: str | None) -> list[Panel]:
    """The heatmaps to show: every layer x head (one row per layer), or the chosen layer/head,
    or each layer's heads combined by `aggregate` (mean or max)."""
    panels: list[Panel] = []
    row = 0
    for m in maps:
        layers, heads = m.weights.shape[0], m.weights.shape[1]
        _check_index("layer", layer, layers, m.name)
        _check_index("head", head, heads, m.name)
        queries = [t for part in m.queries for t in tokens[part]]
        keys = [t for part in m.keys for t in tokens[part]]
        splits = _split(m.queries, tokens), _split(m.keys, tokens), " + ".join(m.queries), " + ".join(m.keys)
        for lay in ([layer] if layer is not None else range(layers)):
            w = m.weights[lay].detach().float().cpu()
            if aggregate is not None:
                columns = [(aggregate, w.mean(0) if aggregate == "mean" else w.amax(0))]
            else:
                columns = [(h, w[h]) for h in ([head] if head is not None else range(heads))]
            for col, (which, weights) in enumerate(columns):
                panels.append(Panel(m.name, lay, which, weights.numpy(), queries, keys, row, col, *splits))
            row += 1
    return panels


def _split(parts: tuple[str, ...], tokens: dict[str, list[str]]) -> int | None:
    """The position where generated tokens follow the text along an axis, if they do."""
    if "generated" not in parts or parts.index("generated") == 0 or not tokens["generated"]:
        return None
    return sum(len(tokens[part]) for part in parts[: parts.index("generated")])


def _check_index(what: str, value: int | None, count: int, name: str) -> None:
    if value is not None and value >= count:
        raise FieldError(what, f"{value} is out of range: the model's {name} has {count} {what}s "
                               f"(0..{count - 1})")


def print_json(maps: list[AttentionMap], tokens: dict[str, list[str]], panels: list[Panel],
               opts: AttentionOptions, out: IO[str] | None = None) -> None:
    """One JSON object: the tokens, and each selected map's weights (rows = queries)."""
    body = {"run": str(opts.run_dir), "tokens": tokens,
            "maps": [{"name": p.name, "layer": p.layer, "head": p.head, "queries": p.queries, "keys": p.keys,
                      "weights": np.round(p.weights.astype(np.float64), 6).tolist()} for p in panels]}
    (out or sys.stdout).write(json.dumps(body, ensure_ascii=False) + "\n")
