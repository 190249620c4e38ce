"""`llmcli import`: a Hugging Face GPT2LMHeadModel / LlamaForCausalLM / MarianMTModel folder or hub id -> a checkpoint.

A local folder may hold model.safetensors, sharded safetensors with model.safetensors.index.json,
or pytorch_model.bin (read with `torch.load(weights_only=True)`, which never runs pickled code); a
hub id such as `gpt2` or `owner/name` is downloaded with `huggingface_hub.snapshot_download`. The
result is an ordinary checkpoint directory (llmcli/checkpoint.py) whose checkpoint.json records
`imported_from`, the architecture and the source's `eos_token_id` / `bos_token_id` / `eos_token`
(a Llama tokenizer's end of text is `</s>`-like, not `<|endoftext|>`). The tokenizer is the
source's tokenizer.json, or GPT-2's vocab.json + merges.txt rebuilt as the same byte-level BPE.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from llmcli.checkpoint import INFO, SOURCE_TOKENIZER, check_output_dir, write_checkpoint
from llmcli.config import Config, DataConfig, ModelConfig, SourceTokenizerConfig, TokenizerConfig
from llmcli.errors import UserError
from llmcli.hf.files import (
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_SPECIAL_TOKENS,
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    HF_TORCH_WEIGHTS,
    HF_TORCH_WEIGHTS_INDEX,
    HF_WEIGHTS,
    HF_WEIGHTS_INDEX,
    describe,
    first,
    parse_dtype,
    read_json,
    token_content,
)
from llmcli.hf.mapping import ARCHITECTURE, hf_tensor_names, model_config_from_hf, state_dict_from_hf
from llmcli.hf.marian import ARCHITECTURE as MARIAN
from llmcli.hf.marian import hf_tensor_names as marian_tensor_names
from llmcli.hf.marian import model_config_from_marian, state_dict_from_marian
from llmcli.hf.seq2seq import marian_tokenizers
from llmcli.model_card import write_model_card
from llmcli.models.registry import build_model
from llmcli.options.checkpoints import ImportOptions
from llmcli.tokenizer import EOT, load_tokenizer

# What `import` downloads from the hub (pytorch_model*.bin only when a repo has no safetensors).
HUB_FILES = [HF_CONFIG, HF_GENERATION_CONFIG, "model*.safetensors", HF_WEIGHTS_INDEX, HF_TOKENIZER,
             HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS, "vocab.json", "merges.txt"]
HUB_TORCH_FILES = ["pytorch_model*.bin", HF_TORCH_WEIGHTS_INDEX]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


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


def import_command(opts: ImportOptions) -> None:
    print_import(import_hf(opts))


# --------------------------------------------------------------------------------------------
# Finding and reading the source


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
            weight_map = read_json(index).get("weight_map")
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


# --------------------------------------------------------------------------------------------
# Tokenizer and special tokens


def _tokenizer_for_import(directory: Path, tokenizer: Path | None) -> tuple[Any, bytes]:
    """(tokenizers.Tokenizer, its tokenizer.json bytes) from --tokenizer, tokenizer.json or vocab+merges."""
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
    specials = read_json(directory / HF_SPECIAL_TOKENS, required=False)
    names = {token_content(v) for v in specials.values()} | {"<|endoftext|>"}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in sorted(n for n in names if n and tok.token_to_id(n) is not None)])
    return tok


def _special_ids(directory: Path, hf: dict[str, Any], tok: Any) -> tuple[Any, Any]:
    """(eos id(s), bos id) from generation_config.json, config.json, then the tokenizer's files."""
    generation = read_json(directory / HF_GENERATION_CONFIG, required=False)
    token_files = {**read_json(directory / HF_SPECIAL_TOKENS, required=False),
                   **read_json(directory / HF_TOKENIZER_CONFIG, required=False)}
    found = []
    for key in ("eos_token", "bos_token"):
        value = generation.get(f"{key}_id", hf.get(f"{key}_id"))
        if value is None:
            content = token_content(token_files.get(key))
            value = tok.token_to_id(content) if content else None
        found.append(value)
    eos, bos = found
    if eos is None:
        eos = tok.token_to_id(EOT)
    return eos, bos


# --------------------------------------------------------------------------------------------
# The command


def import_hf(opts: ImportOptions) -> ImportResult:
    """Turn the GPT2LMHeadModel / LlamaForCausalLM folder (or hub id) `opts.source` into an llmcli
    checkpoint at `opts.out`. Nothing is written on failure."""
    source = str(opts.source)
    out = Path(opts.out).expanduser()
    check_output_dir(out, opts.overwrite)  # before a download
    want = parse_dtype(opts.dtype)
    directory = resolve_source(source)
    inputs = {"the source": directory, **({"the tokenizer file": Path(opts.tokenizer)} if opts.tokenizer else {})}
    check_output_dir(out, opts.overwrite, inputs)
    hf = read_json(directory / HF_CONFIG)
    source_tok_bytes = None
    if MARIAN in (hf.get("architectures") or [hf.get("model_type")]) or hf.get("model_type") == "marian":
        family, config = "marian", model_config_from_marian(hf, str(directory / HF_CONFIG))
        tok, tok_bytes, source_tok_bytes = marian_tokenizers(directory, opts.tokenizer, config)
        hf_state, weights_name = load_hf_weights(directory)
        state, names = state_dict_from_marian(hf_state, config, source=weights_name), marian_tensor_names(config)
    else:
        family, config = model_config_from_hf(hf, str(directory / HF_CONFIG))
        tok, tok_bytes = _tokenizer_for_import(directory, opts.tokenizer)
        hf_state, weights_name = load_hf_weights(directory)
        state, names = state_dict_from_hf(hf_state, config, family, source=weights_name), hf_tensor_names(config, family)
    del hf_state

    with torch.device("meta"):  # no memory, no random init: every weight comes from the source
        model = build_model(config)
    expected = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{weights_name}: {names[name]} has shape {tuple(tensor.shape)}, but "
                            f"{HF_CONFIG} implies {tuple(expected[name].shape)} (for our {name})")
        if not tensor.is_floating_point():
            raise UserError(f"{weights_name}: {names[name]} is {tensor.dtype}, expected floating point weights "
                            "(quantized checkpoints cannot be imported)")
        # Own, contiguous storage: views of a fused tensor would share memory, which safetensors refuses.
        state[name] = tensor.to(want or tensor.dtype).clone(memory_format=torch.contiguous_format)
    for alias, origin in model.tied_weights().items():
        state[alias] = state[origin]
    model.load_state_dict(state, assign=True)
    model.tie_weights()

    warnings = []
    eos_id, bos_id = _special_ids(directory, hf, tok)
    eos_token = tok.id_to_token(first(eos_id)) if eos_id is not None else None
    if tok.token_to_id(EOT) is None:
        if eos_token is not None:
            warnings.append(f"the tokenizer has no {EOT}; its end-of-text token is {eos_token!r} "
                            f"(id {first(eos_id)}), recorded as eos_token_id in {INFO}")
        else:
            warnings.append(f"the tokenizer has no {EOT} and {source} names no eos token: generation will "
                            "not stop early")
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    if tok_vocab > config.vocab_size:
        warnings.append(f"the tokenizer has {tok_vocab} tokens but the model only {config.vocab_size}; "
                        "ids beyond the model's vocabulary cannot be used")

    kind = "char" if type(tok.model).__name__ == "WordLevel" else "bpe"
    run_config = Config(model=config, tokenizer=TokenizerConfig(kind=kind, vocab_size=tok_vocab))
    if config.task == "seq2seq":  # its config.yaml must say it maps pairs
        run_config = dataclasses.replace(run_config, data=DataConfig(task="seq2seq", source="cmudict"),
                                         source_tokenizer=SourceTokenizerConfig(
                                             kind="shared" if source_tok_bytes is None else "char"))
    info = {"imported_from": source, "architecture": (hf.get("architectures") or [{**ARCHITECTURE, "marian": MARIAN}[family]])[0],
            "eos_token_id": eos_id, "bos_token_id": bos_id, "eos_token": eos_token}
    if str(directory) != source:
        info["downloaded_to"] = str(directory)
    kept = {name: (directory / name).read_bytes() for name in (HF_TOKENIZER_CONFIG, HF_GENERATION_CONFIG)
            if (directory / name).is_file() and family != "marian"}  # the chat template, the end tokens
    if source_tok_bytes is not None:
        kept[SOURCE_TOKENIZER] = source_tok_bytes
    write_checkpoint(out, model, run_config, tok_bytes, info, kept)
    write_model_card(out)
    return ImportResult(out=out, source=source, architecture=info["architecture"], family=family,
                        config=config, parameters=model.num_params(),
                        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                        eos_token_id=eos_id, eos_token=eos_token, warnings=warnings)


def print_import(result: ImportResult, console: Any = None) -> None:
    from llmcli import ui

    console = console or ui.stdout
    for warning in result.warnings:
        ui.stderr.print(f"warning: {warning}", markup=False, soft_wrap=True)
    as_ = f"model.arch={result.config.arch}" if result.family == "marian" else f"model.preset={result.family}"
    console.print(f"imported {result.architecture} from {result.source} as {as_} "
                  f"({describe(result.config, result.parameters)}, {result.dtype}) -> {result.out}",
                  markup=False, soft_wrap=True)
    eos = "none" if result.eos_token_id is None else f"{result.eos_token!r} (id {result.eos_token_id})"
    console.print(f"end-of-text token: {eos}", markup=False, soft_wrap=True)
