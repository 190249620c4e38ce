"""Model families by name: `model.arch` in a config (and in a checkpoint's model.json) picks one."""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.models.base import LanguageModel
from llmcli.models.encoder_decoder import EncoderDecoder
from llmcli.models.recurrent import Recurrent
from llmcli.models.recurrent_seq2seq import RecurrentSeq2Seq
from llmcli.models.transformer import Transformer

FAMILIES: dict[str, type[LanguageModel]] = {
    "transformer": Transformer,
    "lstm": Recurrent,
    "gru": Recurrent,
    "rnn": Recurrent,
    "encoder-decoder": EncoderDecoder,
    "gru-seq2seq": RecurrentSeq2Seq,
    "lstm-seq2seq": RecurrentSeq2Seq,
}


def build_model(config: ModelConfig) -> LanguageModel:
    """A freshly initialised model of `config.arch` (call under `torch.device("meta")` to skip init)."""
    return family(config)(config)


def family(config: ModelConfig) -> type[LanguageModel]:
    """The class that builds models of `config.arch`."""
    return FAMILIES[config.arch]
