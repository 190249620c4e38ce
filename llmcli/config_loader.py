"""Reading configs: YAML files plus dotted command-line overrides, into the typed sections of config.py.

A config file maps sections to keys; overrides use the form `section.key=value`, where the value is
parsed as YAML (`train.lr=3e-4`, `data.val_plays=[hamlet]`, `model.n_kv_head=null`). Every value is
coerced to its field's type and checked against its range and the other fields, and every error
names the key and where its value came from (the file or the override).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from llmcli.config import (
    DATA_FIELDS,
    ENCODER_DECODER,
    FAMILY_DEFAULTS,
    MODEL_FIELDS,
    PER_LAYER,
    PRESETS,
    RECURRENT,
    SECTIONS,
    SEQ2SEQ,
    SEQ2SEQ_SOURCE,
    SEQ2SEQ_TASK,
    TRANSFORMER,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from llmcli.errors import ConfigError
from llmcli.recipes.shipped import recipe_names, shipped_recipe


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans (only true/false: `no`, `on`, `off` stay the strings they are,
    so `train.mixed_precision=no` means "no") that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"the key {key!r} appears twice (line {line})")


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_WORD_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def read_yaml(text: str) -> Any:
    """Parse YAML the way every llmcli config file is read (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            shipped = shipped_recipe(str(path))
            if shipped is None:
                raise ConfigError(f"config file not found: {path} (nor is it a shipped recipe: "
                                  f"{', '.join(recipe_names())})")
            path = shipped
        try:
            loaded = read_yaml(path.read_text(encoding="utf-8"))
        except DuplicateKey as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path}: not valid YAML ({first})") from None
        loaded = {} if loaded is None else loaded  # an empty file (or only comments) is the defaults
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (data:, model:, train: ...); "
                              f"got a {type(loaded).__name__}")
        for section, values in loaded.items():
            if values is None:
                values = {}
            if not isinstance(values, dict):
                raise ConfigError(f"'{section}' in {path} must be a mapping of keys")
            for key, value in values.items():
                raw.setdefault(str(section), {})[str(key)] = value
                origin[f"{section}.{key}"] = str(path)
    for item in overrides:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
        origin[key] = f"override '{item}'"
    return build_config(raw, origin)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if key.count(".") not in (1, 2) or not all(key.split(".")):
        raise ConfigError(f"override '{item}': key must be section.key, e.g. train.max_steps=50 "
                          "(or section.group.key, e.g. train.lora.r=8)")
    try:
        value = read_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def build_config(raw: dict[str, dict[str, Any]], origin: dict[str, str] | None = None) -> Config:
    """Turn nested plain values into a validated Config; `origin` maps 'sec.key' to its source."""
    origin = origin or {}
    sections: dict[str, Any] = {}
    for section in raw:
        if section not in SECTIONS:
            where = next((v for k, v in origin.items() if k.startswith(section + ".")), "config")
            known = ", ".join(SECTIONS)
            raise ConfigError(f"unknown section '{section}' in {where} (known: {known})")
    raw = _with_task_defaults(raw)
    for section, cls in _section_classes().items():
        values = dict(raw.get(section, {}))
        if section == "model" and values.get("preset") is not None:
            preset = values["preset"]
            if preset not in PRESETS:
                where = origin.get("model.preset", "config")
                raise ConfigError(f"model.preset: must be one of gpt2, llama, null; got {preset!r} (from {where})")
            values = {**PRESETS[preset], **values}
        if section == "model" and values.get("arch") in FAMILY_DEFAULTS:
            values = {**FAMILY_DEFAULTS[values["arch"]], **values}
        if section == "train" and values.get("max_epochs") is not None:
            values.setdefault("max_steps", None)  # epochs replace the default step count
        sections[section] = _build_section(section, cls, values, origin)
    _check_family_fields(sections["model"], raw.get("model", {}), origin)
    _check_task_fields(sections["data"], raw, origin)
    cfg = Config(**sections)
    _check_cross_fields(cfg, origin)
    return cfg


def _with_task_defaults(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A sequence-to-sequence model.arch implies data.task=seq2seq, and data.task=seq2seq alone
    implies model.arch=encoder-decoder and data.source=cmudict."""
    data, model = dict(raw.get("data") or {}), dict(raw.get("model") or {})
    if "task" not in data and model.get("arch") in SEQ2SEQ:
        data["task"] = "seq2seq"
    if data.get("task") == "seq2seq":
        model.setdefault("arch", ENCODER_DECODER[0])
        data.setdefault("source", SEQ2SEQ_SOURCE)
    return {**raw, "data": data, "model": model}


def _check_family_fields(model: ModelConfig, given: dict[str, Any], origin: dict[str, str]) -> None:
    """Refuse a model setting the user gave that means nothing to the chosen family (null is no
    setting)."""
    for key, value in given.items():
        if value is not None and not model.applies(key):
            *others, last = MODEL_FIELDS[key].metadata["families"]
            families = f"{', '.join(others)} and {last}" if others else last
            raise ConfigError(f"model.{key}: does not apply to model.arch={model.arch} (only to {families}) "
                              f"(from {origin.get(f'model.{key}', 'config')})")


def _check_task_fields(data: DataConfig, raw: dict[str, dict[str, Any]], origin: dict[str, str]) -> None:
    """Refuse a data setting (or the source_tokenizer section) the user gave that means nothing to
    data.task (null is no setting)."""
    given = [(f"data.{key}", DATA_FIELDS[key].metadata["tasks"]) for key, value in raw.get("data", {}).items()
             if key in DATA_FIELDS and value is not None and not data.applies(key)]
    if data.task != "seq2seq":
        given += [(f"source_tokenizer.{key}", SEQ2SEQ_TASK) for key in raw.get("source_tokenizer") or {}]
    for key, (task,) in given:
        raise ConfigError(f"{key}: does not apply to data.task={data.task} (only to {task}) "
                          f"(from {origin.get(key, 'config')})")


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _build_section(section: str, cls: type, values: dict[str, Any], origin: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in _nest(values).items():
        name = f"{section}.{key}"
        where = origin.get(name, "config")
        if key not in fields:
            close = [k for k in fields if k.startswith(key[:3])]
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown key '{name}' (from {where}){hint}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: must be a mapping of keys; got {value!r} (from {where})")
            kwargs[key] = _build_section(name, hints[key], value, origin)
        else:
            kwargs[key] = _coerce(name, value, hints[key], fields[key].metadata, where)
    return cls(**kwargs)


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    """`{"lora.r": 8}` (an override of a group's key) merged into `{"lora": {..., "r": 8}}`."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        group, dot, rest = key.partition(".")
        if dot:
            inner = out.get(group)
            out[group] = {**(inner if isinstance(inner, dict) else {}), rest: value}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _coerce(name: str, value: Any, hint: Any, meta: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{name}: must be one of {choices}; got {value!r} (from {where})")
        return value
    if origin is list and args == (int,):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{name}: must be a list of integers; got {value!r} (from {where})")
        return [_coerce(f"{name}[{i}]", item, int, meta, where) for i, item in enumerate(value)]
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: must be a list of strings; got {value!r} (from {where})")
        return value
    if hint in (int, float) and isinstance(value, str):
        value = _number_from_text(value)  # YAML 1.1 reads `3e-4` as a string
    if hint is bool:
        if isinstance(value, str) and value.strip().lower() in _WORD_BOOLS:
            value = _WORD_BOOLS[value.strip().lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false; got {value!r} (from {where})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{name}: must be an integer; got {value!r} (from {where})")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: must be a number; got {value!r} (from {where})")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be finite; got {value!r} (from {where})")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string; got {value!r} (from {where})")
        return value
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value < low or (meta.get("min_exclusive") and value == low)):
        op = ">" if meta.get("min_exclusive") else ">="
        raise ConfigError(f"{name}: must be {op} {low:g}; got {value!r} (from {where})")
    if high is not None and value > high:
        raise ConfigError(f"{name}: must be <= {high:g}; got {value!r} (from {where})")
    return value


def _number_from_text(text: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "e" not in text.lower() and "." not in text else number


def _check_cross_fields(cfg: Config, origin: dict[str, str]) -> None:
    def fail(key: str, msg: str, source: str | None = None) -> None:
        raise ConfigError(f"{key}: {msg} (from {origin.get(source or key, 'config')})")

    m, t, d = cfg.model, cfg.train, cfg.data
    if m.applies("n_head") and m.d_model % m.n_head:
        fail("model.n_head", f"n_head={m.n_head} must divide d_model={m.d_model}")
    if m.applies("n_kv_head") and m.n_head % m.kv_heads:
        fail("model.n_kv_head", f"n_kv_head={m.kv_heads} must divide n_head={m.n_head}")
    if m.applies("pos") and m.pos == "rope" and m.head_dim % 2:
        fail("model.n_head", f"rope needs an even head size; d_model/n_head = {m.head_dim}")
    if m.applies("layer_value_embeds") and m.layer_value_embeds is not None:
        tables = m.layer_value_embeds
        if len(tables) != m.n_layer or sorted(set(tables) - {-1}) != list(range(m.value_embeds)):
            fail("model.layer_value_embeds", f"needs one table per layer (n_layer={m.n_layer}), -1 for none, using "
                                             f"every table 0..{m.value_embeds - 1} (value_embeds={m.value_embeds}); "
                                             f"got {tables}")
    elif m.applies("value_embeds") and 2 * m.value_embeds > m.n_layer:
        fail("model.value_embeds", f"{m.value_embeds} tables need 2 * {m.value_embeds} layers (each feeds one "
                                   f"of the first and one of the last layers); n_layer={m.n_layer}")
    if t.max_steps is not None and t.max_epochs is not None:
        fail("train.max_epochs", f"give train.max_epochs or train.max_steps, not both (max_steps={t.max_steps} "
                                 f"from {origin.get('train.max_steps', 'config')}; max_steps=null counts epochs)")
    if t.max_steps is None and t.max_epochs is None and t.max_minutes is None:
        fail("train.max_steps", "set train.max_steps, train.max_epochs or train.max_minutes (all are null)")
    if t.min_lr > t.lr:
        fail("train.min_lr", f"min_lr={t.min_lr:g} is larger than lr={t.lr:g}")
    if t.lora.r is not None and not t.lora.targets:
        fail("train.lora.targets", "name at least one module to adapt (e.g. [q, v])")
    if d.val_fraction + d.test_fraction >= 1.0:
        fail("data.val_fraction", "val_fraction + test_fraction must be below 1")
    _check_strategy(t, fail)
    _check_learning_options(cfg, fail)
    _check_seq2seq_fields(cfg, fail, origin)
    _check_layer_sizes(m, fail)


def _check_layer_sizes(m: ModelConfig, fail: Any) -> None:
    """Per-layer sizes (a pruned model): one per layer, heads in whole kv groups."""
    for key in PER_LAYER:
        sizes = getattr(m, key) if m.applies(key) else None
        layers, name = (m.encoder_layers, "encoder layers") if key.startswith("encoder") else (m.n_layer, "n_layer")
        if sizes is not None and len(sizes) != layers:
            fail(f"model.{key}", f"needs one size per layer: {len(sizes)} given, {name}={layers}")
    group = m.n_head // m.kv_heads
    for key in ("layer_heads", "encoder_layer_heads", "cross_layer_heads"):
        for layer, heads in enumerate(getattr(m, key) or () if m.applies(key) else ()):
            if heads > m.n_head or heads % group:
                fail(f"model.{key}", f"layer {layer} has {heads} heads: at most n_head={m.n_head}, in whole "
                                     f"groups of n_head / n_kv_head = {group}")


def _check_seq2seq_fields(cfg: Config, fail: Any, origin: dict[str, str]) -> None:
    """A task that matches the model family, and the encoder-decoder's choices that go together."""
    m, d = cfg.model, cfg.data
    if m.task != d.task:
        if m.task == "seq2seq":
            fail("data.task", f"model.arch={m.arch} maps a source to a target: set data.task=seq2seq "
                              "(source/target pairs)", "data.task" if "data.task" in origin else "model.arch")
        fail("data.task", f"data.task=seq2seq needs a sequence-to-sequence model.arch ({', '.join(SEQ2SEQ)}); "
                          f"got model.arch={m.arch}")
    if d.task == "lm" and d.source == SEQ2SEQ_SOURCE:
        fail("data.source", f"{SEQ2SEQ_SOURCE} is paired data (word -> pronunciation): set data.task=seq2seq")
    if m.arch in TRANSFORMER and m.pos == "sinusoidal":
        fail("model.pos", "sinusoidal positions are the encoder-decoder's; a transformer uses learned or rope")
    if m.arch in ENCODER_DECODER:
        if m.pos == "rope":
            fail("model.pos", "model.arch=encoder-decoder uses sinusoidal or learned positions, not rope")
        if m.act == "swiglu":
            fail("model.act", "model.arch=encoder-decoder uses relu or gelu, not swiglu")
    if (d.source_lang is None) != (d.target_lang is None):
        given = "data.source_lang" if d.source_lang is not None else "data.target_lang"
        fail(given, "set both data.source_lang and data.target_lang (pairs from a translation column)")
    if m.applies("share_embeddings") and m.share_embeddings and cfg.source_tokenizer.kind != "shared":
        fail("model.share_embeddings", f"one embedding table for both sides needs one tokenizer: set "
                                       f"source_tokenizer.kind=shared (it is {cfg.source_tokenizer.kind})")


def _check_learning_options(cfg: Config, fail: Any) -> None:
    """Options that apply to some families, tasks or strategies only."""
    m, t = cfg.model, cfg.train
    for key, value in (("optimizer", t.optimizer != "adamw"), ("ema_decay", t.ema_decay > 0),
                       ("average_last", t.average_last is not None)):
        if value and t.strategy != "ddp":
            fail(f"train.{key}", f"needs train.strategy=ddp (it keeps whole weight matrices on every process); "
                                 f"got {t.strategy}")
    if t.stateful and m.arch not in RECURRENT:
        fail("train.stateful", f"carries a recurrent hidden state; model.arch={m.arch} has none")
    if t.stateful and cfg.data.format != "text":
        fail("train.stateful", f"reads the text in order; data.format={cfg.data.format} trains one example per window")
    if t.batch_tokens is not None and m.task != "seq2seq":
        fail("train.batch_tokens", "fills batches of (source, target) pairs: set it with data.task=seq2seq")
    if t.pack_pairs and m.task != "seq2seq":
        fail("train.pack_pairs", "packs (source, target) pairs into rows: set it with data.task=seq2seq")
    if t.pack_pairs and t.batch_tokens is not None:
        fail("train.pack_pairs", "batches of batch_size pairs packed into rows; train.batch_tokens sorts and cuts "
                                 "batches by length instead: set one of them")
    if t.average_last is not None and t.ema_decay > 0:
        fail("train.average_last", "and train.ema_decay each choose the weights that are evaluated and saved: "
                                   "set one of them")
    if m.arch in ENCODER_DECODER and m.act == "relu2":
        fail("model.act", "model.arch=encoder-decoder uses relu or gelu, not relu2")


def _check_strategy(t: TrainConfig, fail: Any) -> None:
    """Strategy settings that would otherwise be silently ignored."""
    if t.cpu_offload and t.strategy == "ddp":
        fail("train.cpu_offload", "needs train.strategy=fsdp or deepspeed (DDP keeps everything on the device)")
    if t.activation_checkpointing and t.strategy != "fsdp":
        fail("train.activation_checkpointing", f"is applied by FSDP; train.strategy={t.strategy} does not apply it")
    if t.accelerate_config is not None and t.strategy == "ddp":
        fail("train.accelerate_config", "configures FSDP or DeepSpeed; set train.strategy=fsdp or deepspeed")
