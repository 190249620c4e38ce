"""`llmcli export --format hf`: a checkpoint as a folder that `transformers` loads as it is.

The folder holds config.json (see mapping.py), model.safetensors, generation_config.json (bos / eos
/ pad ids), our tokenizer.json unchanged, tokenizer_config.json (`PreTrainedTokenizerFast`, the
special tokens, `model_max_length` = block_size, the checkpoint's chat template or our default
layout as Jinja) and special_tokens_map.json. The eos / bos ids are
the tokenizer's `<|endoftext|>`, or `eos_token_id` / `bos_token_id` from checkpoint.json when an
import recorded them there. A quantized checkpoint is refused unless `--dequantize`. An
encoder-decoder becomes a MarianMTModel folder instead (marian.py, seq2seq.py).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from llmcli.chat_template import DEFAULT_JINJA, jinja_source
from llmcli.chat_template import tokenizer_config as tokenizer_config_of
from llmcli.checkpoint import (
    MODEL_CONFIG,
    SOURCE_TOKENIZER,
    TOKENIZER,
    check_output_dir,
    load_model,
    model_config_from_json,
    read_info,
    read_quantization,
    resolve_checkpoint,
)
from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.hf.files import (
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_SPECIAL_TOKENS,
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    HF_WEIGHTS,
    describe,
    first,
    json_text,
    parse_dtype,
)
from llmcli.hf.mapping import ARCHITECTURE, export_family, hf_config_dict, state_dict_to_hf
from llmcli.hf.marian import ARCHITECTURE as MARIAN
from llmcli.hf.marian import check_exportable, marian_config, state_dict_to_marian
from llmcli.hf.seq2seq import marian_folder_files
from llmcli.io import atomic_replace_dir, atomic_write, atomic_write_text
from llmcli.model_card import CARD, model_card
from llmcli.models import registry
from llmcli.options.checkpoints import ExportOptions
from llmcli.quantize.modules import dequantize_model, quantization_of
from llmcli.tokenizer import EOT, eot_id, load_tokenizer


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
    loader: str = "AutoModelForCausalLM"  # the transformers Auto class that loads it


def is_quantized(directory: Path) -> bool:
    """A checkpoint written by `llmcli quantize` says so in model.json (and in checkpoint.json)."""
    return read_quantization(directory) is not None or "quantization" in read_info(directory)


def exportable_config(src: Path) -> ModelConfig:
    """The model config of checkpoint `src`, refused in one line when its family cannot export."""
    model_config = model_config_from_json(src / MODEL_CONFIG)
    if not registry.family(model_config).exports_to_hf:
        raise UserError(f"{src} holds a model.arch={model_config.arch} model: transformers has no "
                        f"{model_config.arch} class to export it as (model.arch=transformer and encoder-decoder "
                        "export)")
    return model_config


def export_hf(opts: ExportOptions) -> ExportResult:
    """Write the checkpoint `opts.run_dir` as a transformers model folder at `opts.out`.

    Nothing is written unless everything succeeds.
    """
    src = resolve_checkpoint(opts.run_dir)
    out = Path(opts.out).expanduser()
    check_output_dir(out, opts.overwrite, {"the source": src, "the run being exported": Path(opts.run_dir)})
    want = parse_dtype(opts.dtype)
    quantized = is_quantized(src)
    if quantized and not opts.dequantize:
        raise UserError(f"{src} is a quantized checkpoint; transformers cannot load our quantized "
                        "weights, so pass --dequantize to export them as float weights")
    model_config = exportable_config(src)  # refuse before reading the weights
    if model_config.task == "seq2seq":
        check_exportable(model_config)
        family = "marian"
    else:
        family = export_family(model_config)
    if quantized:
        model = load_model(src)
        if quantization_of(model) is not None:
            model = dequantize_model(model)
        if want is not None:
            model = model.to(want)
    else:
        model = load_model(src, dtype=want)
    config = model.config
    if config.task == "seq2seq":
        return _export_marian(model, src, out)
    tensors = state_dict_to_hf(model.state_dict(), config, family)
    stored = next(iter(tensors.values())).dtype

    tok_path = src / TOKENIZER
    tok = load_tokenizer(tok_path)
    info = read_info(src)
    eos_id = info.get("eos_token_id", tok.token_to_id(EOT))
    bos_id = info.get("bos_token_id", first(eos_id))
    eos_token = tok.id_to_token(first(eos_id)) if eos_id is not None else None
    bos_token = tok.id_to_token(bos_id) if bos_id is not None else None
    unk_token = getattr(tok.model, "unk_token", None) or eos_token
    special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                 ("unk_token", unk_token)) if v is not None}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                        "model_max_length": config.block_size, "clean_up_tokenization_spaces": False,
                        "chat_template": jinja_source(tokenizer_config_of(src), str(src)) or DEFAULT_JINJA}
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": first(eos_id)}
    hf_config = hf_config_dict(config, family, bos_token_id=bos_id, eos_token_id=eos_id, dtype=stored)
    texts = {HF_CONFIG: hf_config, HF_GENERATION_CONFIG: generation,
             HF_TOKENIZER_CONFIG: tokenizer_config, HF_SPECIAL_TOKENS: special}

    def build(tmp: Path) -> None:
        atomic_write(tmp / HF_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        for name, obj in texts.items():
            atomic_write_text(tmp / name, json_text(obj))
        shutil.copyfile(tok_path, tmp / HF_TOKENIZER)
        atomic_write_text(tmp / CARD, model_card(src, export=out))

    atomic_replace_dir(out, build)
    return ExportResult(out=out, family=family, architecture=ARCHITECTURE[family], config=config,
                        parameters=model.num_params(), dtype=str(stored).removeprefix("torch."),
                        eos_token_id=first(eos_id), files=sorted([HF_WEIGHTS, HF_TOKENIZER, CARD, *texts]))


def _export_marian(model: Any, src: Path, out: Path) -> ExportResult:
    """A seq2seq checkpoint as a MarianMTModel folder (marian.py, seq2seq.py)."""
    config = model.config
    tensors = state_dict_to_marian(model.state_dict(), config)
    stored = next(iter(tensors.values())).dtype
    eot = eot_id(load_tokenizer(src / TOKENIZER))
    own = src / SOURCE_TOKENIZER
    texts = {HF_CONFIG: json_text(marian_config(config, eos_token_id=eot, dtype=stored)),
             **marian_folder_files(config, src / TOKENIZER, own if own.is_file() else None, eot)}

    def build(tmp: Path) -> None:
        atomic_write(tmp / HF_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        for name, text in texts.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(tmp / name, text)
        atomic_write_text(tmp / CARD, model_card(src, export=out))

    atomic_replace_dir(out, build)
    return ExportResult(out=out, family="marian", architecture=MARIAN, config=config, parameters=model.num_params(),
                        dtype=str(stored).removeprefix("torch."), eos_token_id=eot,
                        files=sorted([HF_WEIGHTS, CARD, *texts]), loader="AutoModelForSeq2SeqLM")


def print_export(result: ExportResult, console: Any = None) -> None:
    from llmcli import ui

    console = console or ui.stdout
    console.print(f"exported {result.architecture} ({describe(result.config, result.parameters)}, "
                  f"{result.dtype}) -> {result.out}", markup=False, soft_wrap=True)
    console.print(f"files: {', '.join(result.files)}", markup=False, soft_wrap=True)
    console.print(f"load it with transformers: {result.loader}.from_pretrained({str(result.out)!r}), "
                  f"AutoTokenizer.from_pretrained({str(result.out)!r})", markup=False, soft_wrap=True)
