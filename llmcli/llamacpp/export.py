"""`llmcli export --format gguf`: a checkpoint as one GGUF file that llama.cpp, ollama and LM Studio run.

The file holds llama.cpp's architecture metadata (`gpt2` or `llama`: mapping.py's families), the
weights (tensors.py), the tokenizer (vocab.py), the chat template (the checkpoint's Jinja template, or
our default layout as Jinja, as `export --format hf` writes it) and the end tokens `llmcli generate`
stops at (the first as eos, a second as eot). Nothing adds a BOS token: our models never saw one.
A LoRA run exports merged into its base, or with --adapter-only as a GGUF LoRA adapter
(adapter.py); --ollama writes a Modelfile beside the file (modelfile.py). Families llama.cpp cannot
run are refused with their `gguf_refusal`, before any weight is read. Nothing is written unless
everything succeeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcli.chat_template import DEFAULT_JINJA, jinja_source, load_chat_template, tokenizer_config
from llmcli.checkpoint import (
    TOKENIZER,
    adapter_base,
    check_output_file,
    end_token_ids,
    is_adapter,
    load_model,
    load_unmerged,
    model_config_of,
    read_info,
    resolve_checkpoint,
)
from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.hf.files import describe
from llmcli.hf.mapping import GPT2, export_family
from llmcli.io import atomic_write, atomic_write_text
from llmcli.llamacpp.adapter import plan_adapter
from llmcli.llamacpp.modelfile import layout_of, modelfile
from llmcli.llamacpp.tensors import Plan, plan_tensors, weights_of
from llmcli.llamacpp.vocab import PRE_TOKENIZER, TOKENIZER_MODEL, GGUFVocab, gguf_vocab
from llmcli.lora import low_rank_factors
from llmcli.models import registry
from llmcli.options.checkpoints import ExportOptions
from llmcli.quantize.modules import dequantize_model, quantization_of
from llmcli.tokenizer import load_tokenizer

MODELFILE = "Modelfile"
# The file must list merges; a vocabulary without any (ASCII characters) gets this one, bytes 0xC0
# 0xC0 in byte-level spelling: no UTF-8 text holds them, so it never applies.
NO_MERGE = "À À"


@dataclasses.dataclass
class GGUFExportResult:
    out: Path
    architecture: str  # llama.cpp's: gpt2 or llama
    config: ModelConfig
    parameters: int
    file_type: str  # gguf.LlamaFileType name, e.g. MOSTLY_Q8_0
    vocab: GGUFVocab
    end_tokens: list[str]
    notes: list[str]
    adapter_base: Path | None = None  # --adapter-only: the checkpoint whose GGUF it applies to
    modelfile: Path | None = None


def export_gguf(opts: ExportOptions) -> GGUFExportResult:
    """Write the checkpoint `opts.run_dir` as the GGUF file `opts.out` (and a Modelfile with --ollama)."""
    src = resolve_checkpoint(opts.run_dir)
    out = Path(opts.out).expanduser()
    inputs = {"the source": src, "the run being exported": Path(opts.run_dir)}
    check_output_file(out, opts.overwrite, inputs)
    modelfile_path = out.parent / MODELFILE if opts.ollama else None
    if modelfile_path is not None:
        check_output_file(modelfile_path, opts.overwrite, inputs, label="the Modelfile")
    config = model_config_of(src)
    refusal = registry.family(config).gguf_refusal
    if refusal:
        raise UserError(f"{src} holds a model.arch={config.arch} model: {refusal}")
    family = export_family(config, "llama.cpp")
    tok = load_tokenizer(src / TOKENIZER)
    vocab = gguf_vocab(tok, config.vocab_size, str(src / TOKENIZER))  # refuse before reading weights
    ends = list(end_token_ids(src, tok))
    if opts.adapter_only:
        plan, parameters, base = _adapter_plan(src, config, family, opts.dtype)
    else:
        model = load_model(src)
        if quantization_of(model) is not None and opts.dequantize:
            model = dequantize_model(model)
        plan = plan_tensors(weights_of(model.state_dict(), quantization_of(model)), config, family, opts.dtype)
        parameters, base = registry.family(config).param_count(config), None  # quantized weights included
    template = jinja_source(tokenizer_config(src), str(src)) or DEFAULT_JINJA
    bos = read_info(src).get("bos_token_id", ends[0] if ends else None)
    if opts.adapter_only:
        metadata = _adapter_metadata
    else:
        def metadata(writer: Any) -> None:
            _model_metadata(writer, family, plan, config, vocab, template, ends, bos, _name(Path(opts.run_dir)))
    atomic_write(out, lambda tmp: _write(tmp, family, plan, metadata))
    if modelfile_path is not None:
        chat = load_chat_template(directory=src)
        stops = [tok.id_to_token(i) for i in ends] + list(chat.stop)
        atomic_write_text(modelfile_path, modelfile(out.name, layout_of(chat), stops, config.block_size))
    return GGUFExportResult(out=out, architecture=family, config=config, parameters=parameters,
                            file_type=plan.file_type(), vocab=vocab, end_tokens=[tok.id_to_token(i) for i in ends],
                            notes=plan.notes, adapter_base=base, modelfile=modelfile_path)


def _adapter_plan(src: Path, config: ModelConfig, family: str, dtype: str) -> tuple[Plan, int, Path]:
    if not is_adapter(src):
        raise UserError(f"{src} holds no LoRA adapter (adapter_model.safetensors): --adapter-only is for runs "
                        "trained with train.lora.r; export the model itself without it")
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise UserError(f"--adapter-only writes float adapters (llama.cpp adds them to the base's matrices): "
                        f"use --dtype float32, float16 or bfloat16, not {dtype}")
    factors = low_rank_factors(load_unmerged(src))
    parameters = sum(b.numel() + a.numel() for b, a in factors.values())
    return plan_adapter(factors, config, family, dtype), parameters, adapter_base(src)


def _name(run: Path) -> str:
    """The model's name in the file: the run's directory (not best/ or last/)."""
    run = run.expanduser().resolve()
    return run.parent.name if run.name in ("best", "last") else run.name


def _write(path: Path, family: str, plan: Plan, metadata: Callable[[Any], None]) -> None:
    """The GGUF file: the metadata `metadata(writer)` adds, then the tensors."""
    import gguf

    writer = gguf.GGUFWriter(path, family)
    metadata(writer)
    for tensor in plan.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=gguf.GGMLQuantizationType[tensor.qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _adapter_metadata(writer: Any) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # alpha / r is folded into the factors (adapter.py)


def _model_metadata(writer: Any, family: str, plan: Plan, config: ModelConfig, vocab: GGUFVocab, template: str,
                    ends: list[int], bos: int | None, name: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[plan.file_type()])
    if any(t.qtype.startswith("Q") for t in plan.tensors):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # 1) the architecture
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ff_dim)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    if family == GPT2:
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_vocab_size(config.vocab_size)
    # 2) the tokenizer
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges or [NO_MERGE])
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    # 3) generation: the end tokens, no BOS added, the chat template
    if ends:
        writer.add_eos_token_id(ends[0])
    if len(ends) > 1:
        writer.add_eot_token_id(ends[1])
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(template)


def print_gguf_export(result: GGUFExportResult, console: Any = None) -> None:
    from llmcli import ui

    console = console or ui.stdout
    say = lambda text: console.print(text, markup=False, soft_wrap=True)  # noqa: E731
    size = result.out.stat().st_size / 2**20
    if result.adapter_base is not None:
        say(f"exported a LoRA adapter for llama.cpp's {result.architecture} ({result.file_type}, {size:.2f} MiB) "
            f"-> {result.out}")
        say(f"its base: {result.adapter_base} (export it with llmcli export {result.adapter_base} --format gguf)")
        say(f"run it: llama-cli -m BASE.gguf --lora {result.out}")
    else:
        say(f"exported llama.cpp {result.architecture} ({describe(result.config, result.parameters)}, "
            f"{result.file_type}, {size:.2f} MiB) -> {result.out}")
        say(f"tokenizer: {result.vocab.describe()}; ends at {', '.join(result.end_tokens) or 'no token'}")
        say(f"run it: llama-cli -m {result.out}")
    for note in result.notes:
        say(f"note: {note}")
    if result.modelfile is not None:
        say(f"ollama: {result.modelfile} (ollama create NAME -f {result.modelfile})")
