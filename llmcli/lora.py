"""LoRA through peft: adapters on a frozen base, named in the family's own terms, and merging them.

`add_adapter(model, cfg)` maps `train.lora.targets` (terms of `LanguageModel.lora_targets`) to module
names and has peft put LoRA layers there, in place: the model stays the same LanguageModel (forward,
decode state, ...) with only the adapter's weights trainable. On a base quantized by `llmcli quantize`
the adapters are QLoRA-style: the frozen integer weights are dequantized per call (see
`QuantizedWeight.matmul`), the adapter is float32. An adapter travels as peft's own state dict and
`adapter_config.json` (`adapter_state`, `peft_config_of`, `load_adapter`); `merge` folds it into a
float base (a quantized one is dequantized first, by the loader) and leaves a plain model;
`low_rank_factors` gives the adapter unmerged, as factors in the base weights' own layouts.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

from llmcli.config import LoraConfig
from llmcli.errors import UserError
from llmcli.models.base import LanguageModel
from llmcli.quantize.modules import QuantizedLinear

ADAPTER = "default"  # peft's adapter name; one adapter per model here


def target_modules(model: LanguageModel, targets: list[str]) -> list[str]:
    """The module names the terms `targets` name in this model; an unknown term lists the valid ones."""
    offered = model.lora_targets()
    unknown = [t for t in targets if t not in offered]
    if unknown:
        raise UserError(f"train.lora.targets: unknown target {unknown[0]!r} for this {model.config.arch} "
                        f"(valid: {', '.join(offered)})")
    return [name for term in dict.fromkeys(targets) for name in offered[term]]


def peft_config(model: LanguageModel, cfg: LoraConfig) -> Any:
    """The peft LoraConfig for `cfg` on `model` (exact module names)."""
    from peft import LoraConfig as PeftLoraConfig

    config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                            target_modules=target_modules(model, cfg.targets))
    return _with_custom_modules(config)


def _with_custom_modules(config: Any) -> Any:
    """peft's LoRA Linear also over our QuantizedLinear (peft's documented hook for custom layers)."""
    from peft.tuners.lora.layer import Linear

    config._register_custom_module({QuantizedLinear: Linear})
    return config


def add_adapter(model: LanguageModel, cfg: LoraConfig) -> LanguageModel:
    """Freeze `model` and add a fresh LoRA adapter where `cfg.targets` say, in place."""
    return _inject(model, peft_config(model, cfg), cfg.targets)


def _inject(model: LanguageModel, config: Any, terms: list[str]) -> LanguageModel:
    from peft.tuners.lora import LoraModel

    try:
        with warnings.catch_warnings():  # peft warns of layer types it has no built-in LoRA for (ours)
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraModel(model, config, ADAPTER)
    except ValueError as exc:
        raise UserError(_unsupported(model, config, terms, exc)) from None
    return model


def _unsupported(model: LanguageModel, config: Any, terms: list[str], exc: ValueError) -> str:
    """peft's refusal of a layer type, in our terms."""
    offered = model.lora_targets()
    for term in terms:
        for name in offered.get(term, []):
            module = model.get_submodule(name)
            if repr(module).splitlines()[0].rstrip("(") in str(exc):
                return (f"train.lora.targets: {term!r} is a {type(module).__name__} layer ({name}), which "
                        f"peft's LoRA cannot adapt ({str(exc).split('. ', 1)[-1].rstrip('.')})")
    return f"train.lora: peft refused the adapter: {exc}"


def is_adapted(model: nn.Module) -> bool:
    return isinstance(getattr(model, "peft_config", None), dict)


def peft_config_of(model: nn.Module) -> Any:
    return model.peft_config[ADAPTER]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights alone, under peft's names (`...q_proj.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER,
                                                                           save_embedding_layers=False).items()}


def load_adapter(model: LanguageModel, config: Any, state: dict[str, torch.Tensor], source: str) -> LanguageModel:
    """Add the adapter saved as (peft config, state) to `model`, in place; names checked against it."""
    from peft import set_peft_model_state_dict

    _inject(model, _with_custom_modules(config), [])
    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"{source} does not match its adapter config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    return model.eval()


def low_rank_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (B, A)} for every adapted module, with the update to its weight exactly B @ A
    in the weight's own layout ([out, in] for a Linear, [tokens, dim] for an embedding) and
    alpha / r folded into the factors: what a runtime that applies adapters unmerged (llama.cpp) needs."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or ADAPTER not in layer.scaling:
            continue
        scale = layer.scaling[ADAPTER]
        if ADAPTER in layer.lora_A:
            b, a = layer.lora_B[ADAPTER].weight * scale, layer.lora_A[ADAPTER].weight
        else:  # an embedding: peft's A is [r, tokens] and B [dim, r], its update (B A)^T * scale
            b, a = layer.lora_embedding_A[ADAPTER].T, (layer.lora_embedding_B[ADAPTER] * scale).T
        out[name] = (b.detach().float(), a.detach().float())
    return out


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: LanguageModel) -> LanguageModel:
    """Fold the adapter into the base weights (W + B A * alpha / r) and drop the LoRA layers, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    del model.peft_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model
