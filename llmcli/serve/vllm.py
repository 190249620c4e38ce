"""`llmcli serve RUN --engine vllm [-- vLLM options]`: the same checkpoint served by vLLM.

vLLM loads Hugging Face folders, so the checkpoint is exported once with `llmcli export`'s code
(hf/export.py: config.json, model.safetensors, tokenizer.json + tokenizer_config.json with the chat
template) into a folder beside it, `.NAME.vllm` (reused while the checkpoint's files are unchanged:
a stamp of their names, sizes and modification times is kept in the folder; re-exported otherwise).
Then vLLM's OpenAI server replaces this process (`python -m vllm.entrypoints.openai.api_server`),
with serve's host, port, model name, batch size and dtype translated and everything after `--`
passed on as it is (e.g. `--tensor-parallel-size 4`). The API key travels in VLLM_API_KEY, not on
the command line. This is the path for GPUs, tensor/pipeline parallelism and several machines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from llmcli import ui
from llmcli.checkpoint import resolve_checkpoint
from llmcli.errors import UserError
from llmcli.io import atomic_write_text
from llmcli.options.checkpoints import ExportOptions
from llmcli.options.inference import ServeOptions

STAMP = "llmcli-source.json"  # in the exported folder: which checkpoint files it was made from
VLLM_SERVER = "vllm.entrypoints.openai.api_server"


def serve_with_vllm(opts: ServeOptions, name: str) -> None:
    """Refuse what vLLM cannot serve, export (or reuse) the HF folder, then exec vLLM's server."""
    src = resolve_checkpoint(opts.run_dir)
    check_servable(src)
    if importlib.util.find_spec("vllm") is None:
        raise UserError("--engine vllm needs the vllm package, which is not installed (pip install vllm, on a "
                        "machine with a supported GPU)")
    folder = exported_folder(src)
    argv = vllm_command(folder, opts, name)
    env = dict(os.environ)
    if opts.api_key is not None:
        env["VLLM_API_KEY"] = opts.api_key
    ui.log(f"handing {folder} to vLLM: {' '.join(argv[1:])}")
    os.execve(argv[0], argv, env)


def check_servable(src: Path) -> None:
    """A one-line refusal for a checkpoint vLLM cannot load (its family or its config does not
    export, or it is an encoder-decoder: vLLM serves decoder-only models)."""
    from llmcli.hf.export import exportable_config
    from llmcli.hf.mapping import export_family

    config = exportable_config(src)
    if config.task == "seq2seq":
        raise UserError(f"{src} holds a sequence-to-sequence model (model.arch={config.arch}, exported as "
                        "MarianMTModel), which vLLM does not serve; use --engine llmcli")
    export_family(config, "vLLM")


def export_dir(src: Path) -> Path:
    """Where the HF folder of checkpoint `src` is cached: beside it, never inside it."""
    src = src.resolve()
    return src.parent / f".{src.name}.vllm"


def source_stamp(src: Path) -> str:
    """A fingerprint of the checkpoint's files (names, sizes, modification times)."""
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def exported_folder(src: Path) -> Path:
    """The HF folder of `src`, exported now unless a folder made from the same files exists.
    A quantized checkpoint is exported dequantized (vLLM cannot read our integer weights)."""
    from llmcli.hf.export import export_hf, is_quantized

    out, stamp = export_dir(src), source_stamp(src)
    stamp_file = out / STAMP
    if stamp_file.is_file() and json.loads(stamp_file.read_text()).get("stamp") == stamp:
        ui.log(f"reusing {out} (exported from the same checkpoint files)")
        return out
    ui.log(f"exporting {src} for vLLM to {out}")
    export_hf(ExportOptions(run_dir=src, out=out, overwrite=True, dequantize=is_quantized(src)))
    atomic_write_text(stamp_file, json.dumps({"source": str(src.resolve()), "stamp": stamp}) + "\n")
    return out


def vllm_command(folder: Path, opts: ServeOptions, name: str, python: str = sys.executable) -> list[str]:
    """vLLM's OpenAI server command line for the exported `folder`, serve's options and model `name`."""
    argv = [python, "-m", VLLM_SERVER, "--model", str(folder), "--served-model-name", name,
            "--host", opts.host, "--port", str(opts.port), "--max-num-seqs", str(opts.max_batch_size)]
    if opts.dtype != "auto":
        argv += ["--dtype", opts.dtype]
    if opts.chat_template is not None:
        argv += ["--chat-template", str(opts.chat_template)]
    return argv + list(opts.vllm_args or ())
