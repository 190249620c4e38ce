"""`llmcli export`: a checkpoint for another runtime, `--format hf` (llmcli/hf/) or `--format gguf`
(llmcli/llamacpp/)."""

from __future__ import annotations

from llmcli.options.checkpoints import ExportOptions


def export_command(opts: ExportOptions) -> None:
    if opts.format == "gguf":
        from llmcli.llamacpp.export import export_gguf, print_gguf_export

        print_gguf_export(export_gguf(opts))
    else:
        from llmcli.hf.export import export_hf, print_export

        print_export(export_hf(opts))
