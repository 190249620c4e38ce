"""Our encoder-decoder <-> `transformers`' MarianMTModel: config.json and tensor names, both ways.

MarianMTModel is the original Transformer's layout: sinusoidal positions (not stored), post-norm
layers, embeddings scaled by sqrt(d_model), biases everywhere, a head with `final_logits_bias`.
So a config exports when it has model.pos=sinusoidal, norm_placement=post, bias=true and
norm_eps=1e-5 (Marian's LayerNorm); anything else is refused, naming the fields. The source and
target share one vocabulary (`share_encoder_decoder_embeddings`) or have their own (`vocab_size`
is then the source's, `decoder_vocab_size` the target's). `_tensor_pairs` is the one table of
names, read in both directions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llmcli.config import ModelConfig
from llmcli.config_loader import build_config
from llmcli.errors import ConfigError, UserError
from llmcli.hf.files import HF_CONFIG

ARCHITECTURE = "MarianMTModel"
NORM_EPS = 1e-5  # nn.LayerNorm's default, which Marian's layers use
_IGNORED = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")


def check_exportable(config: ModelConfig) -> None:
    """A UserError naming every field that MarianMTModel cannot reproduce."""
    def shown(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)  # as YAML writes it

    wrong = [f"model.{key}={shown(value)}" for key, value, want in (
        ("arch", config.arch, "encoder-decoder"), ("pos", config.pos, "sinusoidal"),
        ("norm_placement", config.norm_placement, "post"), ("bias", config.bias, True),
        ("norm_eps", config.norm_eps, NORM_EPS)) if value != want]
    if wrong:
        raise UserError(f"{', '.join(wrong)} cannot be exported as {ARCHITECTURE} (it needs model.arch=encoder-decoder "
                        f"with sinusoidal positions, post-norm, bias=true and norm_eps=1e-05)")
    if config.per_layer_sizes:
        raise UserError(f"a pruned model ({', '.join(config.per_layer_sizes)}) cannot be exported as {ARCHITECTURE}: "
                        "it gives every attention n_head heads of d_model / n_head and every layer of a side the "
                        "same feed-forward width")


def _tensor_pairs(config: ModelConfig) -> Iterator[tuple[str, str, str]]:
    """(our name, Marian's name, how): "same", or "row" (our [V] bias is their [1, V] buffer)."""
    if config.share_embeddings:
        yield "tgt_embed.weight", "model.shared.weight", "same"
    else:
        yield "src_embed.weight", "model.encoder.embed_tokens.weight", "same"
        yield "tgt_embed.weight", "model.decoder.embed_tokens.weight", "same"
    attention = [f"{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")]
    attention = [name.replace("o_proj", "out_proj") for name in attention]
    feed_forward = [f"{fc}.{w}" for fc in ("fc1", "fc2") for w in ("weight", "bias")]
    norms = {"self_attn_norm": "self_attn_layer_norm", "cross_attn_norm": "encoder_attn_layer_norm",
             "final_norm": "final_layer_norm"}
    for side, count in (("encoder", config.encoder_layers), ("decoder", config.n_layer)):
        for i in range(count):
            ours, theirs = f"{side}.{i}.", f"model.{side}.layers.{i}."
            blocks = [("self_attn", "self_attn")] + ([("cross_attn", "encoder_attn")] if side == "decoder" else [])
            for our_block, their_block in blocks:
                for name in attention:
                    yield f"{ours}{our_block}.{name}", f"{theirs}{their_block}.{name}", "same"
            for name in feed_forward:
                yield ours + name, theirs + name, "same"
            for our_norm, their_norm in norms.items():
                if side == "encoder" and our_norm == "cross_attn_norm":
                    continue
                for w in ("weight", "bias"):
                    yield f"{ours}{our_norm}.{w}", f"{theirs}{their_norm}.{w}", "same"
    if not config.tie_embeddings:
        yield "lm_head.weight", "lm_head.weight", "same"
    yield "lm_head.bias", "final_logits_bias", "row"


def hf_tensor_names(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> the Marian tensor it comes from."""
    return {ours: theirs for ours, theirs, _ in _tensor_pairs(config)}


def state_dict_to_marian(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> MarianMTModel tensors (contiguous; a tied head written once). A shared table
    also goes to the encoder's and decoder's embed_tokens: transformers ties those to model.shared
    only when tie_word_embeddings is set, and reads them from the file otherwise."""
    out = {}
    for ours, theirs, how in _tensor_pairs(config):
        tensor = state[ours][None] if how == "row" else state[ours]
        out[theirs] = tensor.detach().contiguous()
    if config.share_embeddings:
        for side in ("encoder", "decoder"):
            out[f"model.{side}.embed_tokens.weight"] = out["model.shared.weight"].clone()
    return out


def state_dict_from_marian(hf_state: dict[str, torch.Tensor], config: ModelConfig, *,
                           source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """MarianMTModel tensors -> our state dict (a tied head included). The copies HF may store of a
    shared or tied table (encoder/decoder embed_tokens, lm_head) are accepted when equal."""
    pairs = list(_tensor_pairs(config))
    state = dict(hf_state)
    aliases = {"model.encoder.embed_tokens.weight": "model.shared.weight",
               "model.decoder.embed_tokens.weight": "model.shared.weight"} if config.share_embeddings else {}
    if config.tie_embeddings:
        aliases["lm_head.weight"] = "model.shared.weight" if config.share_embeddings else \
            "model.decoder.embed_tokens.weight"
    if "final_logits_bias" not in state:  # transformers re-creates it as zeros when missing
        state["final_logits_bias"] = torch.zeros(1, config.vocab_size)
    for alias, origin in aliases.items():
        if alias in state and origin not in state:
            state[origin] = state[alias]
        if alias in state and not torch.equal(state.pop(alias), state[origin]):
            raise UserError(f"{source}: {alias} differs from {origin}, but config.json ties them")
    missing = [theirs for _, theirs, _ in pairs if theirs not in state]
    if missing:
        raise UserError(f"{source} is missing tensors: {', '.join(missing[:4])}")
    used = {theirs for _, theirs, _ in pairs}
    unexpected = sorted(k for k in state if k not in used and k not in _IGNORED)
    if unexpected:
        raise UserError(f"{source} has tensors a {ARCHITECTURE} with this config does not use: {', '.join(unexpected[:4])}")
    out = {ours: state[theirs][0] if how == "row" else state[theirs] for ours, theirs, how in pairs}
    if config.tie_embeddings:
        out["lm_head.weight"] = out["tgt_embed.weight"]
    return out


def marian_config(config: ModelConfig, *, eos_token_id: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A config.json that transformers reads as exactly `config`'s model. The end token is also the
    decoder's start token and the padding (as our decoder starts from <|endoftext|>)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {"architectures": [ARCHITECTURE], "model_type": "marian", "is_encoder_decoder": True,
            "vocab_size": config.source_vocab_size, "decoder_vocab_size": config.vocab_size,
            "share_encoder_decoder_embeddings": config.share_embeddings,
            "tie_word_embeddings": config.tie_embeddings, "d_model": config.d_model,
            "encoder_layers": config.encoder_layers, "decoder_layers": config.n_layer,
            "encoder_attention_heads": config.n_head, "decoder_attention_heads": config.n_head,
            "encoder_ffn_dim": config.ff_dim, "decoder_ffn_dim": config.ff_dim,
            "activation_function": config.act, "scale_embedding": True,
            "max_position_embeddings": max(config.block_size, config.source_context),
            "dropout": config.dropout, "attention_dropout": config.dropout, "activation_dropout": 0.0,
            "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "init_std": 0.02, "use_cache": True,
            "pad_token_id": eos_token_id, "eos_token_id": eos_token_id, "decoder_start_token_id": eos_token_id,
            "bos_token_id": None, "forced_eos_token_id": None, "torch_dtype": dtype_name, "dtype": dtype_name,
            # ours, read back by import: the context limits Marian's one table size cannot hold
            "llmcli_block_size": config.block_size, "llmcli_source_block_size": config.source_context}


def model_config_from_marian(hf: dict[str, Any], source: str = HF_CONFIG) -> ModelConfig:
    """Our ModelConfig for a Marian config.json, or a UserError naming what we cannot reproduce."""
    def get(key: str, default: Any = None) -> Any:
        return default if hf.get(key) is None else hf[key]

    for key, want in (("scale_embedding", True), ("encoder_layerdrop", 0.0), ("decoder_layerdrop", 0.0)):
        if get(key, want) != want:
            raise UserError(f"{source}: {ARCHITECTURE} with {key}={hf[key]} is not supported")
    for ours, (enc, dec) in {"heads": ("encoder_attention_heads", "decoder_attention_heads"),
                             "ffn dims": ("encoder_ffn_dim", "decoder_ffn_dim")}.items():
        if get(enc) != get(dec):
            raise UserError(f"{source}: {enc}={get(enc)} and {dec}={get(dec)} differ (ours has one number of {ours})")
    act = get("activation_function", "gelu")
    if act not in ("relu", "gelu"):
        raise UserError(f"{source}: {ARCHITECTURE} with activation_function={act} is not supported (relu or gelu)")
    shared = bool(get("share_encoder_decoder_embeddings", True))
    positions = int(get("max_position_embeddings", 1024))
    try:
        fields = dict(arch="encoder-decoder", n_layer=hf["decoder_layers"], n_encoder_layer=hf["encoder_layers"],
                      n_head=hf["encoder_attention_heads"], d_model=hf["d_model"], d_ff=hf["encoder_ffn_dim"],
                      vocab_size=get("decoder_vocab_size", hf["vocab_size"]) if not shared else hf["vocab_size"],
                      src_vocab_size=None if shared else hf["vocab_size"], share_embeddings=shared,
                      block_size=int(get("llmcli_block_size", positions)),
                      source_block_size=int(get("llmcli_source_block_size", positions)),
                      dropout=float(get("dropout", 0.0)), pos="sinusoidal", act=act, norm_placement="post",
                      bias=True, norm_eps=NORM_EPS, tie_embeddings=bool(get("tie_word_embeddings", True)))
    except KeyError as exc:
        raise UserError(f"{source}: {ARCHITECTURE} config has no {exc.args[0]}") from None
    for key, default in (("n_encoder_layer", fields.get("n_layer")), ("d_ff", 4 * int(fields.get("d_model", 0))),
                         ("source_block_size", fields.get("block_size"))):
        if fields.get(key) == default:
            fields[key] = None  # the config's own default: model.json as our training writes it
    try:
        return build_config({"model": fields}, {f"model.{k}": source for k in fields}).model
    except ConfigError as exc:
        raise UserError(f"{source}: cannot be expressed as an llmcli model: {exc}") from None
