"""The files of a MarianMTModel folder beyond its weights: tokenizers, generation settings.

Export writes the source side's tokenizer as the folder's `tokenizer.json` (what
`AutoTokenizer.from_pretrained(folder)` loads to encode inputs), with a post-processor that
appends `<|endoftext|>` as our encoder expects; a target side with a tokenizer of its own goes to
`target_tokenizer/` (decode outputs with `AutoTokenizer.from_pretrained(folder + "/target_tokenizer")`).
`generation_config.json` starts the decoder from `<|endoftext|>`, stops at it, and allows the
decoder's whole context (`max_length` = block_size). Import reads the same layout back, the
appended end token taken off the source tokenizer again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.hf.files import (
    HF_GENERATION_CONFIG,
    HF_SPECIAL_TOKENS,
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    json_text,
)
from llmcli.tokenizer import EOT, load_tokenizer

TARGET_TOKENIZER_DIR = "target_tokenizer"


def _with_end_token(tokenizer_json: str, eot: int) -> str:
    """tokenizer.json text whose encoding (with special tokens) appends <|endoftext|>."""
    spec = json.loads(tokenizer_json)
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": EOT, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": EOT, "type_id": 0}}],
        "special_tokens": {EOT: {"id": EOT, "ids": [eot], "tokens": [EOT]}},
    }
    return json.dumps(spec, ensure_ascii=False, indent=2)


def _without_end_token(tokenizer_json: str) -> str:
    """Undo `_with_end_token` (other post-processors are left as they are)."""
    spec = json.loads(tokenizer_json)
    post = spec.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing" and list(post.get("special_tokens") or {}) == [EOT]:
        spec["post_processor"] = None
    return json.dumps(spec, ensure_ascii=False, indent=2)


def _token_files(tok: Any, max_length: int) -> dict[str, Any]:
    unk = getattr(tok.model, "unk_token", None) or EOT
    special = {"eos_token": EOT, "pad_token": EOT, "unk_token": unk}
    return {HF_TOKENIZER_CONFIG: {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                                  "model_max_length": max_length, "clean_up_tokenization_spaces": False,
                                  "model_input_names": ["input_ids", "attention_mask"]},  # what generate() takes
            HF_SPECIAL_TOKENS: special}


def marian_folder_files(config: ModelConfig, tokenizer: Path, source_tokenizer: Path | None,
                        eot: int) -> dict[str, str]:
    """Every text file of the exported folder beside config.json and the weights: relative path -> text."""
    source = load_tokenizer(source_tokenizer or tokenizer)
    files = {HF_TOKENIZER: _with_end_token(source.to_str(), eot)}
    files.update({name: json_text(obj) for name, obj in _token_files(source, config.source_context).items()})
    if source_tokenizer is not None:
        target = load_tokenizer(tokenizer)
        files[f"{TARGET_TOKENIZER_DIR}/{HF_TOKENIZER}"] = target.to_str(pretty=True)
        files.update({f"{TARGET_TOKENIZER_DIR}/{name}": json_text(obj)
                      for name, obj in _token_files(target, config.block_size).items()})
    files[HF_GENERATION_CONFIG] = json_text({"decoder_start_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
                                             "bos_token_id": None, "forced_eos_token_id": None,
                                             "max_length": config.block_size, "num_beams": 1})
    return files


def marian_tokenizers(directory: Path, override: Path | None, config: ModelConfig) -> tuple[Any, bytes, bytes | None]:
    """(target tokenizer, its tokenizer.json bytes, the source's own bytes or None when shared)
    from an exported Marian folder (`override`: use this tokenizer.json for the shared one)."""
    if override is not None:
        source_text, target_path = Path(override).expanduser().read_text(encoding="utf-8"), None
    else:
        path = directory / HF_TOKENIZER
        if not path.is_file():
            raise UserError(f"no {HF_TOKENIZER} in {directory}: import needs the tokenizers (a SentencePiece "
                            "Marian tokenizer is not supported; pass --tokenizer FILE)")
        source_text = path.read_text(encoding="utf-8")
        target_path = directory / TARGET_TOKENIZER_DIR / HF_TOKENIZER
    source_text = _without_end_token(source_text)
    if config.share_embeddings or target_path is None or not target_path.is_file():
        if not config.share_embeddings:
            raise UserError(f"{directory} has separate source and target vocabularies but no "
                            f"{TARGET_TOKENIZER_DIR}/{HF_TOKENIZER} for the target side")
        return _parse(source_text, directory / HF_TOKENIZER), source_text.encode(), None
    target = load_tokenizer(target_path)
    _parse(source_text, directory / HF_TOKENIZER)
    return target, target_path.read_bytes(), source_text.encode()


def _parse(text: str, where: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises plain Exceptions
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{where}: not a valid tokenizer.json ({reason})") from None
