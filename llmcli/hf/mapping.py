"""Our models <-> `transformers`' GPT2LMHeadModel / LlamaForCausalLM: families, config.json, tensor names.

A config exports as GPT-2 when it has layernorm, learned positions, gelu, biases and n_kv_head =
n_head (tied or untied head), as Llama when it has rmsnorm, rope, swiglu and no biases (grouped-query
attention and a tied head are fine); other mixes have no `transformers` counterpart and are refused,
naming the fields. Importing refuses what our `Transformer` does not reproduce (rope scaling, sliding
windows, attention or MLP biases in Llama, ...), naming the setting. `tensor_pairs` is the one table
of how our parameter names correspond to theirs, read in both directions (and on to llama.cpp's
names through gguf's own table of HF names: llmcli/llamacpp/tensors.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import torch

from llmcli.config import PRESETS, ModelConfig
from llmcli.config_loader import build_config
from llmcli.errors import ConfigError, UserError
from llmcli.hf.files import HF_CONFIG

GPT2, LLAMA = "gpt2", "llama"
ARCHITECTURE = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM"}
FAMILY_NAME = {GPT2: "GPT-2", LLAMA: "Llama"}
# Architectures we read; Mistral is Llama's maths when its sliding window never applies.
IMPORTABLE = {"GPT2LMHeadModel": GPT2, "LlamaForCausalLM": LLAMA, "MistralForCausalLM": LLAMA}
MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA}

# HF checkpoints carry these buffers; they are recomputed, not learned.
_IGNORED_HF_TENSORS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


# --------------------------------------------------------------------------------------------
# Which family a config belongs to


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


_NEEDS = {
    GPT2: {"norm": "layernorm", "pos": "learned", "act": "gelu", "bias": True},
    LLAMA: {"norm": "rmsnorm", "pos": "rope", "act": "swiglu", "bias": False},
}


def _extras(config: ModelConfig) -> list[tuple[str, str]]:
    """(setting, override that turns it off) for each llmcli extra that neither GPT-2 nor Llama has."""
    found = []
    if config.qk_norm:
        found.append(("model.qk_norm=true", "model.qk_norm=false"))
    if config.logit_softcap is not None:
        found.append((f"model.logit_softcap={_fmt(config.logit_softcap)}", "model.logit_softcap=null"))
    if config.value_embeds:  # layer_value_embeds only ever names tables 0..value_embeds - 1
        found.append((f"model.value_embeds={config.value_embeds}", "model.value_embeds=0"))
    return found


def _mismatches(config: ModelConfig, family: str) -> list[tuple[str, str]]:
    """(setting, override that fixes it) for each field where `config` differs from `family`."""
    wrong = [(f"model.{key}={_fmt(getattr(config, key))}", f"model.{key}={_fmt(want)}")
             for key, want in _NEEDS[family].items() if getattr(config, key) != want]
    if family == GPT2 and config.kv_heads != config.n_head:
        wrong.append((f"model.n_kv_head={config.n_kv_head}", f"model.n_kv_head={config.n_head}"))
    return wrong


def export_family(config: ModelConfig, target: str = "transformers") -> str:
    """"gpt2" or "llama": the model family (of `target`, named in refusals) with exactly this config's
    maths; else a UserError naming every setting in the way and the overrides that train an
    exportable model (one line: the user fixes everything in one go)."""
    extras = _extras(config)
    mismatches = {family: _mismatches(config, family) for family in _NEEDS}
    family = min(mismatches, key=lambda f: len(mismatches[f]))  # the nearest; GPT-2 on a tie
    pruned = bool(config.layer_heads or config.layer_ff)
    if not extras and not mismatches[family] and not pruned:
        return family
    problems = []
    if pruned:
        problems.append("a pruned model (per-layer model.layer_heads / model.layer_ff): GPT-2 and Llama give "
                        "every layer the same heads and MLP width")
    if extras:
        problems.append(f"{', '.join(s for s, _ in extras)}: GPT-2 and Llama have no QK-norm, logit "
                        "soft-capping or value-embedding tables")
    if mismatches[family]:  # the nearest family differs, so both do: name both
        problems.append("; ".join(f"{', '.join(s for s, _ in mismatches[f])} cannot be exported as "
                                  f"{FAMILY_NAME[f]}" for f in _NEEDS))
    fixes = " ".join(fix for _, fix in extras + mismatches[family])
    name = FAMILY_NAME[family]
    advice = (f"train an exportable model with the overrides {fixes} (it then exports as {name})" if fixes
              else f"export the model it was pruned from (it exports as {name})")
    if pruned and fixes:
        advice += " and do not prune it structurally"
    raise UserError(f"{target} cannot run this model: {'; '.join(problems)}; {advice}")


# --------------------------------------------------------------------------------------------
# Tensor names: ours <-> theirs


def tensor_pairs(config: ModelConfig, family: str) -> Iterator[tuple[tuple[str, ...], str, str]]:
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
    return {our: hf for ours, hf, _ in tensor_pairs(config, family) for our in ours}


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
    pairs = list(tensor_pairs(config, family))
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
    for ours, hf, how in tensor_pairs(config, family):
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
    """A config.json that transformers 4.x and 5.x both read as exactly `config`'s model.

    A Llama config carries `rope_theta` both at the top level (4.x) and in `rope_parameters` (5.x).
    """
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
            default_ff = ModelConfig(**{**PRESETS[LLAMA], "d_model": d_model}).ff_dim
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
