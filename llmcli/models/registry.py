"""Model families by name: `model.arch` in a config (and in a checkpoint's model.json) picks one."""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.models.base import LanguageModel
from llmcli.models.transformer import Transformer

FAMILIES: dict[str, type[LanguageModel]] = {
    "transformer": Transformer,
}


def build_model(config: ModelConfig) -> LanguageModel:
    """A freshly initialised model of `config.arch` (call under `torch.device("meta")` to skip init)."""
    return FAMILIES[config.arch](config)
