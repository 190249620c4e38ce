"""Hugging Face `transformers` interop: export checkpoints as GPT-2 / Llama model folders, import them back.

`llmcli export RUN --format hf --out DIR` writes a folder that `transformers.AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained(DIR)` load as they are:

* `config.json`: a `GPT2LMHeadModel` config for the GPT-2 family of configs (layernorm, learned
  positions, gelu, biases, n_kv_head = n_head; tied or untied head), a `LlamaForCausalLM` config for
  the Llama family (rmsnorm, rope, swiglu, no biases; grouped-query attention and a tied head are
  fine). Other mixes have no `transformers` counterpart and are refused, naming the fields.
  The Llama config carries `rope_theta` both at the top level (transformers 4.x) and in
  `rope_parameters` (transformers 5.x).
* `model.safetensors` (GPT-2's Conv1D matrices are stored transposed, q/k/v fused into `c_attn`),
* `generation_config.json` (bos/eos/pad ids),
* `tokenizer.json` (ours, unchanged), `tokenizer_config.json` (`PreTrainedTokenizerFast`, the
  special tokens, `model_max_length` = block_size) and `special_tokens_map.json`.

A quantized checkpoint (a `quantization` entry in model.json or checkpoint.json) is refused unless
`--dequantize`, which exports its dequantized float weights (llmcli.quantize.load_dequantized_model).
The eos/bos ids are the tokenizer's `<|endoftext|>`, or `eos_token_id` / `bos_token_id` from
checkpoint.json when an import recorded them there.

Everything is written with plain JSON and safetensors: `transformers` is not needed to export or
import, only to check the result (the tests do, to 1e-4 in the logits).

`llmcli import SOURCE --out DIR` reads a local `GPT2LMHeadModel` / `LlamaForCausalLM` folder
(`model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or `pytorch_model.bin`
read with `torch.load(weights_only=True)`, which never runs pickled code), or downloads a hub id such as
`gpt2` or `owner/name` with `huggingface_hub.snapshot_download`, and writes an ordinary checkpoint
directory (see llmcli/checkpoint.py) that eval, generate and quantize read like any other. Its
checkpoint.json records `imported_from`, the architecture and the source's `eos_token_id` /
`bos_token_id` / `eos_token` (a Llama tokenizer's end of text is `</s>`-like, not `<|endoftext|>`).
The tokenizer is the source's tokenizer.json (or GPT-2's vocab.json + merges.txt, rebuilt as the
same byte-level BPE); weights are stored as float32 unless `dtype` says otherwise.
Architectures whose maths our `Transformer` does not reproduce (rope scaling, sliding windows,
attention or MLP biases in Llama, ...) are refused, naming the setting.

The tensor-name mapping below (`state_dict_from_hf` / `state_dict_to_hf`) is the one place that knows
how our parameter names correspond to theirs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmcli.config import Config, ModelConfig, TokenizerConfig, build_config
from llmcli.errors import ConfigError, UserError
from llmcli.io import read_json_object

GPT2, LLAMA = "gpt2", "llama"
ARCHITECTURE = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM"}
FAMILY_NAME = {GPT2: "GPT-2", LLAMA: "Llama"}
# Architectures we read; Mistral is Llama's maths when its sliding window never applies.
IMPORTABLE = {"GPT2LMHeadModel": GPT2, "LlamaForCausalLM": LLAMA, "MistralForCausalLM": LLAMA}
MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA}

HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"
HF_TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS = "special_tokens_map.json"
# What `import` downloads from the hub (pytorch_model*.bin only when a repo has no safetensors).
HUB_FILES = [HF_CONFIG, HF_GENERATION_CONFIG, "model*.safetensors", HF_WEIGHTS_INDEX, HF_TOKENIZER,
             HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS, "vocab.json", "merges.txt"]
HUB_TORCH_FILES = ["pytorch_model*.bin", HF_TORCH_WEIGHTS_INDEX]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HF checkpoints carry these buffers; they are recomputed, not learned.
_IGNORED_HF_TENSORS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


# --------------------------------------------------------------------------------------------
# Which family a config belongs to


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def export_family(config: ModelConfig) -> str:
    """"gpt2" or "llama": the `transformers` model with exactly this config's maths; else a UserError."""
    needs = {
        GPT2: {"norm": "layernorm", "pos": "learned", "act": "gelu", "bias": True},
        LLAMA: {"norm": "rmsnorm", "pos": "rope", "act": "swiglu", "bias": False},
    }
    problems = []
    for family, fields in needs.items():
        wrong = [f"model.{key}={_fmt(getattr(config, key))}" for key, want in fields.items()
                 if getattr(config, key) != want]
        if family == GPT2 and config.kv_heads != config.n_head:
            wrong.append(f"model.n_kv_head={config.n_kv_head}")
        if not wrong:
            return family
        problems.append(f"{', '.join(wrong)} cannot be exported as {FAMILY_NAME[family]}")
    raise UserError("; ".join(problems) + " (GPT-2 needs layernorm, learned positions, gelu, bias=true and "
                    "n_kv_head=n_head; Llama needs rmsnorm, rope, swiglu and bias=false)")


# --------------------------------------------------------------------------------------------
# Tensor names: ours <-> theirs


def _tensor_pairs(config: ModelConfig, family: str) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """(our names, HF name, how): "same" (identical layout), "t" (Conv1D: transposed) or
    "qkv_w"/"qkv_b" (GPT-2's fused c_attn = q, k, v side by side, weight transposed)."""
    if family == GPT2:
        yield ("tok_embed.weight",), "transformer.wte.weight", "same"
        yield ("pos_embed.weight",), "transformer.wpe.weight", "same"
        for i in range(config.n_layer):
            hf, ours = f"transformer.h.{i}.", f"blocks.{i}."
            for their, our in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                yield (f"{ours}{our}.weight",), f"{hf}{their}.weight", "same"
                yield (f"{ours}{our}.bias",), f"{hf}{their}.bias", "same"
            yield tuple(f"{ours}attn.{p}_proj.weight" for p in "qkv"), f"{hf}attn.c_attn.weight", "qkv_w"
            yield tuple(f"{ours}attn.{p}_proj.bias" for p in "qkv"), f"{hf}attn.c_attn.bias", "qkv_b"
            for their, our in (("attn.c_proj", "attn.out_proj"), ("mlp.c_fc", "mlp.up_proj"),
                               ("mlp.c_proj", "mlp.down_proj")):
                yield (f"{ours}{our}.weight",), f"{hf}{their}.weight", "t"
                yield (f"{ours}{our}.bias",), f"{hf}{their}.bias", "same"
        yield ("final_norm.weight",), "transformer.ln_f.weight", "same"
        yield ("final_norm.bias",), "transformer.ln_f.bias", "same"
    elif family == LLAMA:
        yield ("tok_embed.weight",), "model.embed_tokens.weight", "same"
        renames = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
                   "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
                   "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.out_proj",
                   "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
                   "mlp.down_proj": "mlp.down_proj"}
        for i in range(config.n_layer):
            for their, our in renames.items():
                yield (f"blocks.{i}.{our}.weight",), f"model.layers.{i}.{their}.weight", "same"
        yield ("final_norm.weight",), "model.norm.weight", "same"
    else:
        raise ValueError(f"unknown family {family!r}")
    if not config.tie_embeddings:
        yield ("lm_head.weight",), "lm_head.weight", "same"


def hf_tensor_names(config: ModelConfig, family: str) -> dict[str, str]:
    """Our parameter name -> the HF tensor it comes from."""
    return {our: hf for ours, hf, _ in _tensor_pairs(config, family) for our in ours}


def _add_prefix(hf_state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Checkpoints saved from GPT2Model / LlamaModel (the hub's `gpt2` among them) lack the prefix."""
    prefix, probe = ("transformer.", "wte.weight") if family == GPT2 else ("model.", "embed_tokens.weight")
    if probe not in hf_state or prefix + probe in hf_state:
        return hf_state
    return {(k if k == "lm_head.weight" else prefix + k): v for k, v in hf_state.items()}


def _name_list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig,
                       family: str | None = None, *, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel / LlamaForCausalLM tensors -> our state dict (lm_head included, tied or not).

    The result may hold views of the input (transposes, splits). Missing tensors and tensors we have
    no place for raise a UserError naming them; the buffers HF stores (GPT-2's `attn.bias`, old
    Llama's `rotary_emb.inv_freq`) and a tied `lm_head.weight` are ignored.
    """
    family = family or export_family(config)
    hf_state = _add_prefix(hf_state, family)
    pairs = list(_tensor_pairs(config, family))
    missing = [hf for _, hf, _ in pairs if hf not in hf_state]
    if missing:
        raise UserError(f"{source} is missing tensors: {_name_list(missing)}")
    used = {hf for _, hf, _ in pairs}
    unexpected = sorted(k for k in hf_state if k not in used and not _IGNORED_HF_TENSORS.search(k)
                        and not (k == "lm_head.weight" and config.tie_embeddings))
    if unexpected:
        raise UserError(f"{source} has tensors a {ARCHITECTURE[family]} with this config does not use: "
                        f"{_name_list(unexpected)}")
    out: dict[str, torch.Tensor] = {}
    for ours, hf, how in pairs:
        tensor = hf_state[hf]
        if how == "same":
            out[ours[0]] = tensor
        elif how == "t":
            out[ours[0]] = tensor.t()
        else:
            if how == "qkv_w":
                tensor = tensor.t()
            if tensor.shape[0] != 3 * config.d_model:
                raise UserError(f"{source}: {hf} has shape {tuple(hf_state[hf].shape)}, but n_embd="
                                f"{config.d_model} implies {3 * config.d_model} fused q/k/v outputs")
            out.update(zip(ours, tensor.split(config.d_model, dim=0), strict=True))
    if config.tie_embeddings:
        out["lm_head.weight"] = out["tok_embed.weight"]
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig,
                     family: str | None = None) -> dict[str, torch.Tensor]:
    """Our state dict -> GPT2LMHeadModel / LlamaForCausalLM tensors (contiguous, ready for safetensors).

    A tied head is written once, as the embedding, the way `save_pretrained` does it.
    """
    family = family or export_family(config)
    out: dict[str, torch.Tensor] = {}
    for ours, hf, how in _tensor_pairs(config, family):
        if how == "same":
            tensor = state[ours[0]]
        elif how == "t":
            tensor = state[ours[0]].t()
        else:
            tensor = torch.cat([state[name] for name in ours], dim=0)
            if how == "qkv_w":
                tensor = tensor.t()
        out[hf] = tensor.detach().contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Configs: ours <-> config.json


def hf_config_dict(config: ModelConfig, family: str, *, bos_token_id: Any = None, eos_token_id: Any = None,
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A config.json that transformers 4.x and 5.x both read as exactly `config`'s model."""
    dtype_name = str(dtype).removeprefix("torch.")
    common = {"architectures": [ARCHITECTURE[family]], "model_type": family, "vocab_size": config.vocab_size,
              "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
              "tie_word_embeddings": config.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
              "torch_dtype": dtype_name, "dtype": dtype_name}
    if family == GPT2:
        return {**common, "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.d_model,
                "n_inner": config.ff_dim, "n_positions": config.block_size, "n_ctx": config.block_size,
                "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
                "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    return {**common, "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.kv_heads, "hidden_size": config.d_model,
            "head_dim": config.head_dim, "intermediate_size": config.ff_dim, "hidden_act": "silu",
            "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "attention_bias": False, "attention_dropout": config.dropout, "mlp_bias": False,
            "pretraining_tp": 1}


def model_config_from_hf(hf: dict[str, Any], source: str = HF_CONFIG) -> tuple[str, ModelConfig]:
    """(family, our ModelConfig) for a config.json, or a UserError naming what we cannot reproduce."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    model_type = hf.get("model_type")
    if arch is not None:
        family = IMPORTABLE.get(arch)
    else:
        family = MODEL_TYPES.get(model_type)
    if family is None:
        what = f"architecture {arch}" if arch else f"model_type {model_type!r}"
        raise UserError(f"{source}: {what} is not supported (import reads {', '.join(IMPORTABLE)})")
    name = arch or model_type

    def unsupported(setting: str, why: str = "") -> UserError:
        return UserError(f"{source}: {name} with {setting} is not supported{why}")

    def get(key: str, default: Any = None) -> Any:
        value = hf.get(key)
        return default if value is None else value

    try:
        if family == GPT2:
            act = get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise unsupported(f"activation_function={act}", " (only the tanh gelu, gelu_new)")
            for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("add_cross_attention", False)):
                if bool(get(key, ok)) != ok:
                    raise unsupported(f"{key}={_fmt(hf[key])}")
            d_model, d_ff = int(hf["n_embd"]), get("n_inner")
            fields = dict(preset=GPT2, n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=d_model,
                          d_ff=None if d_ff in (None, 4 * d_model) else d_ff, vocab_size=hf["vocab_size"],
                          block_size=hf["n_positions"], dropout=float(get("resid_pdrop", 0.0)),
                          norm_eps=float(get("layer_norm_epsilon", 1e-5)),
                          tie_embeddings=bool(get("tie_word_embeddings", True)))
        else:
            act = get("hidden_act", "silu")
            if act != "silu":
                raise unsupported(f"hidden_act={act}", " (only silu, i.e. SwiGLU)")
            for key in ("attention_bias", "mlp_bias"):
                if get(key, False):
                    raise unsupported(f"{key}=true")
            window = hf.get("sliding_window")
            if window is not None and hf.get("use_sliding_window", True) and \
                    window < hf["max_position_embeddings"]:
                raise unsupported(f"sliding_window={window}", " (only full causal attention)")
            rope_theta = _rope_theta(hf, unsupported)
            d_model, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            head_dim = hf.get("head_dim")
            if head_dim is not None and head_dim * n_head != d_model:
                raise unsupported(f"head_dim={head_dim}", f" (ours is hidden_size/num_attention_heads="
                                  f"{d_model // n_head})")
            kv = get("num_key_value_heads", n_head)
            d_ff = int(hf["intermediate_size"])
            default_ff = ModelConfig(**{**_preset(LLAMA), "d_model": d_model}).ff_dim
            fields = dict(preset=LLAMA, n_layer=hf["num_hidden_layers"], n_head=n_head,
                          n_kv_head=None if kv == n_head else kv, d_model=d_model,
                          d_ff=None if d_ff == default_ff else d_ff, vocab_size=hf["vocab_size"],
                          block_size=hf["max_position_embeddings"],
                          dropout=float(get("attention_dropout", 0.0)),
                          norm_eps=float(get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
                          tie_embeddings=bool(get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise UserError(f"{source}: {name} config has no {exc.args[0]}") from None
    try:
        return family, build_config({"model": fields}, {f"model.{k}": source for k in fields}).model
    except ConfigError as exc:
        raise UserError(f"{source}: cannot be expressed as an llmcli model: {exc}") from None


def _preset(family: str) -> dict[str, Any]:
    from llmcli.config import PRESETS

    return PRESETS[family]


def _rope_theta(hf: dict[str, Any], unsupported: Any) -> float:
    """rope_theta from a 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters) Llama config."""
    params = dict(hf.get("rope_parameters") or {})
    for key in ("rope_scaling", "rope_parameters"):
        value = hf.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or any(isinstance(v, dict) for v in value.values()):
            raise unsupported(f"{key}={json.dumps(value)}")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise unsupported(f"{key} rope_type={kind}", " (only plain rope)")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if factor not in (None, 1, 1.0):
        raise unsupported(f"partial_rotary_factor={factor}")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


# --------------------------------------------------------------------------------------------
# Helpers for both directions


def _read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    if not path.is_file() and not required:
        return {}
    return read_json_object(path)


def _parse_dtype(name: str | None, *, allow_auto: bool) -> torch.dtype | None:
    if name is None or (allow_auto and name == "auto"):
        return None
    if name not in DTYPES:
        choices = ", ".join([*DTYPES, *(["auto"] if allow_auto else [])])
        raise UserError(f"--dtype must be one of {choices}; got {name!r}")
    return DTYPES[name]


def _check_out(out: Path, overwrite: bool, protect: Path | None = None) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(f"{out} already exists (pass --overwrite to replace it)")
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a directory")
    if protect is not None:
        target, src = out.resolve(), protect.resolve()
        if target == src or target in src.parents:
            raise UserError(f"--out {out} would replace the source {protect} itself")


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------
# Export


@dataclasses.dataclass
class ExportResult:
    out: Path
    family: str
    architecture: str
    config: ModelConfig
    parameters: int
    dtype: str
    eos_token_id: int | None
    files: list[str]


def is_quantized(directory: Path) -> bool:
    """A checkpoint written by `llmcli quantize` marks itself with a `quantization` entry."""
    for name in ("model.json", "checkpoint.json"):
        try:
            raw = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and "quantization" in raw:
            return True
    return False


def _dequantized_model(directory: Path, dtype: torch.dtype | None) -> Any:
    try:
        from llmcli.quantize import load_dequantized_model
    except ImportError:
        raise UserError(f"{directory} is a quantized checkpoint and this version of llmcli cannot "
                        "dequantize it; export the float checkpoint it was quantized from") from None
    return load_dequantized_model(directory, dtype=dtype)


def export_hf(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, dequantize: bool = False,
              dtype: str | None = None) -> ExportResult:
    """Write the checkpoint at `checkpoint` (a run or checkpoint dir) as a transformers model folder.

    `dtype` ("float32", "bfloat16", "float16"; None keeps the stored dtype) sets the written weights.
    Nothing is written unless everything succeeds; an existing `out` needs `overwrite`.
    """
    from safetensors.torch import save_file

    from llmcli.checkpoint import TOKENIZER, read_info, resolve_checkpoint
    from llmcli.io import atomic_replace_dir, atomic_write, atomic_write_text
    from llmcli.model import load_model, model_config_from_json
    from llmcli.tokenizer import EOT, load_tokenizer

    src = resolve_checkpoint(checkpoint)
    out = Path(out).expanduser()
    _check_out(out, overwrite, protect=src)
    want = _parse_dtype(dtype, allow_auto=True)
    if is_quantized(src):
        if not dequantize:
            raise UserError(f"{src} is a quantized checkpoint; transformers cannot load our quantized "
                            "weights, so pass --dequantize to export them as float weights")
        model = _dequantized_model(src, want)
    else:
        config = model_config_from_json(src / "model.json")
        export_family(config)  # refuse before reading the weights
        model = load_model(src, dtype=want)
    config = model.config
    family = export_family(config)
    tensors = state_dict_to_hf(model.state_dict(), config, family)
    stored = next(iter(tensors.values())).dtype

    tok_path = src / TOKENIZER
    tok = load_tokenizer(tok_path)
    info = read_info(src)
    eos_id = info.get("eos_token_id", tok.token_to_id(EOT))
    bos_id = info.get("bos_token_id", _first(eos_id))
    eos_token = tok.id_to_token(_first(eos_id)) if eos_id is not None else None
    bos_token = tok.id_to_token(bos_id) if bos_id is not None else None
    unk_token = getattr(tok.model, "unk_token", None) or eos_token
    special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                 ("unk_token", unk_token)) if v is not None}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                        "model_max_length": config.block_size, "clean_up_tokenization_spaces": False}
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": _first(eos_id)}
    hf_config = hf_config_dict(config, family, bos_token_id=bos_id, eos_token_id=eos_id, dtype=stored)
    texts = {HF_CONFIG: hf_config, HF_GENERATION_CONFIG: generation,
             HF_TOKENIZER_CONFIG: tokenizer_config, HF_SPECIAL_TOKENS: special}

    def build(tmp: Path) -> None:
        atomic_write(tmp / HF_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        for name, obj in texts.items():
            atomic_write_text(tmp / name, _json_text(obj))
        shutil.copyfile(tok_path, tmp / HF_TOKENIZER)

    atomic_replace_dir(out, build)
    return ExportResult(out=out, family=family, architecture=ARCHITECTURE[family], config=config,
                        parameters=model.num_params(), dtype=str(stored).removeprefix("torch."),
                        eos_token_id=_first(eos_id), files=sorted([HF_WEIGHTS, HF_TOKENIZER, *texts]))


# --------------------------------------------------------------------------------------------
# Import


@dataclasses.dataclass
class ImportResult:
    out: Path
    source: str
    architecture: str
    family: str
    config: ModelConfig
    parameters: int
    dtype: str
    eos_token_id: int | list[int] | None
    eos_token: str | None
    warnings: list[str]


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and ".." not in source and not source.endswith(".")


def resolve_source(source: str) -> Path:
    """A local HF model folder, or the folder `huggingface_hub` downloaded a hub id into."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{source} is not a directory (expected a Hugging Face model folder or hub id)")
        return path
    if not looks_like_hub_id(source):
        raise UserError(f"import source not found: {source} (not a local folder nor a hub id like owner/name)")
    return download_from_hub(source)


def download_from_hub(repo_id: str) -> Path:
    """Download only what import reads (config, safetensors, tokenizer files) from the hub."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id} is not a local folder, and downloading it from the Hugging Face hub "
                        "needs the huggingface_hub package (pip install huggingface_hub)") from None

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
        except Exception as exc:  # network, auth, missing repo: many exception types, all user-facing
            reason = " ".join(str(exc).split())[:400] or type(exc).__name__
            raise UserError(f"{repo_id} is not a local folder, and downloading it from the Hugging Face "
                            f"hub failed: {reason}") from None

    path = fetch(HUB_FILES)
    if not list(path.glob("model*.safetensors")):
        path = fetch(HUB_TORCH_FILES)
    return path


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or ["unpickling error"])[0]
        raise UserError(f"{path}: refusing to load, it needs more than tensors to unpickle "
                        f"(read with weights_only=True): {first}") from None
    except (OSError, RuntimeError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: cannot read weights ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a dict of tensors")
    return state


def _load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: cannot read weights ({exc})") from None


def load_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of an HF model folder, and a name for messages (the file or index read)."""
    for index_name, single, loader in ((HF_WEIGHTS_INDEX, HF_WEIGHTS, _load_safetensors_file),
                                       (HF_TORCH_WEIGHTS_INDEX, HF_TORCH_WEIGHTS, _load_torch_file)):
        if (directory / single).is_file():
            return loader(directory / single), str(directory / single)
        index = directory / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index}: has no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (directory / shard).is_file():
                    raise UserError(f"{index} names the shard {shard}, which is not in {directory}")
                state.update(loader(directory / shard))
            return state, str(index)
    raise UserError(f"no weights in {directory} (expected {HF_WEIGHTS}, {HF_WEIGHTS_INDEX}, "
                    f"{HF_TORCH_WEIGHTS} or {HF_TORCH_WEIGHTS_INDEX})")


def _tokenizer_for_import(directory: Path, tokenizer: str | Path | None) -> tuple[Any, bytes]:
    """(tokenizers.Tokenizer, its tokenizer.json bytes) from --tokenizer, tokenizer.json or vocab+merges."""
    from llmcli.tokenizer import load_tokenizer

    if tokenizer is not None or (directory / HF_TOKENIZER).is_file():
        path = Path(tokenizer).expanduser() if tokenizer is not None else directory / HF_TOKENIZER
        tok = load_tokenizer(path)
        return tok, path.read_bytes()
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tok = _byte_level_bpe(directory)
        return tok, tok.to_str(pretty=True).encode("utf-8")
    extra = " (only a SentencePiece tokenizer.model: convert it with transformers' " \
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir), or pass --tokenizer)" \
        if (directory / "tokenizer.model").is_file() else " (pass --tokenizer FILE)"
    raise UserError(f"no {HF_TOKENIZER} (nor vocab.json + merges.txt) in {directory}{extra}")


def _byte_level_bpe(directory: Path) -> Any:
    """GPT-2's slow-tokenizer files as a tokenizers byte-level BPE (what GPT2TokenizerFast builds)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    try:
        model = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{directory}: cannot read vocab.json + merges.txt ({reason})") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = _read_json(directory / HF_SPECIAL_TOKENS, required=False)
    names = {_token_content(v) for v in specials.values()} | {"<|endoftext|>"}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in sorted(n for n in names if n and tok.token_to_id(n) is not None)])
    return tok


def _special_ids(directory: Path, hf: dict[str, Any], tok: Any) -> tuple[Any, Any]:
    """(eos id(s), bos id) from generation_config.json, config.json, then the tokenizer's files."""
    from llmcli.tokenizer import EOT

    generation = _read_json(directory / HF_GENERATION_CONFIG, required=False)
    token_files = {**_read_json(directory / HF_SPECIAL_TOKENS, required=False),
                   **_read_json(directory / HF_TOKENIZER_CONFIG, required=False)}
    found = []
    for key in ("eos_token", "bos_token"):
        value = generation.get(f"{key}_id", hf.get(f"{key}_id"))
        if value is None:
            content = _token_content(token_files.get(key))
            value = tok.token_to_id(content) if content else None
        found.append(value)
    eos, bos = found
    if eos is None:
        eos = tok.token_to_id(EOT)
    return eos, bos


def import_hf(source: str | Path, out: str | Path, *, overwrite: bool = False, dtype: str | None = "float32",
              tokenizer: str | Path | None = None) -> ImportResult:
    """Turn a GPT2LMHeadModel / LlamaForCausalLM folder (or hub id) into an llmcli checkpoint at `out`.

    `dtype` ("float32" default, "bfloat16", "float16", or "auto"/None to keep the stored dtype) sets the
    saved weights. `tokenizer` replaces the source's tokenizer.json. Nothing is written on failure.
    """
    from llmcli.checkpoint import INFO, RUN_CONFIG, TOKENIZER
    from llmcli.io import atomic_replace_dir, atomic_write, atomic_write_json
    from llmcli.model import Transformer, save_model
    from llmcli.tokenizer import EOT

    source = str(source)
    out = Path(out).expanduser()
    _check_out(out, overwrite)
    want = _parse_dtype(dtype, allow_auto=True)
    directory = resolve_source(source)
    if out.exists() and out.resolve() == directory.resolve():
        raise UserError(f"--out {out} would replace the source {source} itself")
    hf = _read_json(directory / HF_CONFIG)
    family, config = model_config_from_hf(hf, str(directory / HF_CONFIG))
    tok, tok_bytes = _tokenizer_for_import(directory, tokenizer)
    hf_state, weights_name = load_hf_weights(directory)
    state = state_dict_from_hf(hf_state, config, family, source=weights_name)
    del hf_state

    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    names = hf_tensor_names(config, family)
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{weights_name}: {names[name]} has shape {tuple(tensor.shape)}, but "
                            f"{HF_CONFIG} implies {tuple(expected[name].shape)} (for our {name})")
        if not tensor.is_floating_point():
            raise UserError(f"{weights_name}: {names[name]} is {tensor.dtype}, expected floating point weights "
                            "(quantized checkpoints cannot be imported)")
        # Own, contiguous storage: views of a fused tensor would share memory, which safetensors refuses.
        state[name] = tensor.to(want or tensor.dtype).clone(memory_format=torch.contiguous_format)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_embed.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_embed.weight

    warnings = []
    eos_id, bos_id = _special_ids(directory, hf, tok)
    eos_token = tok.id_to_token(_first(eos_id)) if eos_id is not None else None
    if tok.token_to_id(EOT) is None:
        if eos_token is not None:
            warnings.append(f"the tokenizer has no {EOT}; its end-of-text token is {eos_token!r} "
                            f"(id {_first(eos_id)}), recorded as eos_token_id in {INFO}")
        else:
            warnings.append(f"the tokenizer has no {EOT} and {source} names no eos token: generation will "
                            "not stop early")
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    if tok_vocab > config.vocab_size:
        warnings.append(f"the tokenizer has {tok_vocab} tokens but the model only {config.vocab_size}; "
                        "ids beyond the model's vocabulary cannot be used")

    kind = "char" if type(tok.model).__name__ == "WordLevel" else "bpe"
    run_config = Config(model=config, tokenizer=TokenizerConfig(kind=kind, vocab_size=tok_vocab))
    info = {"imported_from": source, "architecture": (hf.get("architectures") or [ARCHITECTURE[family]])[0],
            "eos_token_id": eos_id, "bos_token_id": bos_id, "eos_token": eos_token}
    if str(directory) != source:
        info["downloaded_to"] = str(directory)

    def build(tmp: Path) -> None:
        save_model(model, tmp)
        atomic_write(tmp / TOKENIZER, lambda p: p.write_bytes(tok_bytes))
        run_config.save(tmp / RUN_CONFIG)
        atomic_write_json(tmp / INFO, info)

    atomic_replace_dir(out, build)
    return ImportResult(out=out, source=source, architecture=info["architecture"], family=family,
                        config=config, parameters=model.num_params(),
                        dtype=str(model.tok_embed.weight.dtype).removeprefix("torch."),
                        eos_token_id=eos_id, eos_token=eos_token, warnings=warnings)


# --------------------------------------------------------------------------------------------
# Command output


def _describe(config: ModelConfig, parameters: int) -> str:
    from llmcli.ui import format_count

    heads = f"{config.n_head} heads" + (f" / {config.kv_heads} kv" if config.kv_heads != config.n_head else "")
    return (f"{config.n_layer} layers, d_model {config.d_model}, {heads}, vocab {config.vocab_size}, "
            f"context {config.block_size}, {'tied' if config.tie_embeddings else 'untied'} head; "
            f"{format_count(parameters)} parameters")


def print_export(result: ExportResult, console: Any = None) -> None:
    from llmcli import ui

    console = console or ui.stdout
    console.print(f"exported {result.architecture} ({_describe(result.config, result.parameters)}, "
                  f"{result.dtype}) -> {result.out}", markup=False, soft_wrap=True)
    console.print(f"files: {', '.join(result.files)}", markup=False, soft_wrap=True)
    console.print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(result.out)!r}), "
                  f"AutoTokenizer.from_pretrained({str(result.out)!r})", markup=False, soft_wrap=True)


def print_import(result: ImportResult, console: Any = None) -> None:
    from llmcli import ui

    console = console or ui.stdout
    for warning in result.warnings:
        ui.stderr.print(f"warning: {warning}", markup=False, soft_wrap=True)
    console.print(f"imported {result.architecture} from {result.source} as model.preset={result.family} "
                  f"({_describe(result.config, result.parameters)}, {result.dtype}) -> {result.out}",
                  markup=False, soft_wrap=True)
    eos = "none" if result.eos_token_id is None else f"{result.eos_token!r} (id {result.eos_token_id})"
    console.print(f"end-of-text token: {eos}", markup=False, soft_wrap=True)
