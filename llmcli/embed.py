"""Sequence embeddings: texts in, one unit-length float32 vector each out (`llmcli embed`, serve's
/v1/embeddings).

Each family pools its own states (`LanguageModel.embed` and `pooling`): decoders and recurrent
models average their last hidden states over the text's tokens, sequence-to-sequence models their
encoder's states over the source's. Vectors are L2-normalized, as OpenAI's are, so a dot product
is the cosine similarity. Texts are batched by length (little padding); a text longer than the
model takes is refused, naming it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from llmcli import ui
from llmcli.errors import UserError
from llmcli.io import read_text_file
from llmcli.models.base import LanguageModel
from llmcli.tokenizer import encode, unknown_chars, unknown_noun

BATCH_TOKENS = 8192  # padded tokens per forward


class Embedder:
    """A model and the tokenizer its inputs go through (a seq2seq model's source tokenizer)."""

    def __init__(self, model: LanguageModel, tokenizer: Any):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.limit = model.embedding_input_length
        self.device = next(model.parameters()).device

    def ids(self, text: str, where: str) -> list[int]:
        """A text's token ids; unknown characters, no tokens at all, or more than the model takes are refused."""
        unknown = unknown_chars(self.tokenizer, text)
        if unknown:
            shown = " ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise UserError(f"{where} contains {unknown_noun(unknown)} this model's tokenizer never saw: {shown}")
        ids = encode(self.tokenizer, text)
        self.check(ids, where)
        return ids

    def check(self, ids: Sequence[int], where: str) -> None:
        if not ids:
            raise UserError(f"{where} has no tokens")
        if self.limit is not None and len(ids) > self.limit:
            raise UserError(f"{where} has {len(ids)} tokens; this model embeds at most {self.limit}")

    @torch.inference_mode()
    def vectors(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        """[len(inputs), d] float32 unit vectors, in the order of `inputs` (token id lists)."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out: list[tuple[int, np.ndarray]] = []
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and len(inputs[order[end]]) * (end - start + 1) <= BATCH_TOKENS:
                end += 1
            rows = [inputs[i] for i in order[start:end]]
            width = max(len(r) for r in rows)
            idx = torch.zeros(len(rows), width, dtype=torch.long)
            for b, ids in enumerate(rows):
                idx[b, :len(ids)] = torch.tensor(ids)
            pooled = self.model.embed(idx.to(self.device), [len(r) for r in rows])
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
            out += zip(order[start:end], pooled, strict=True)
            start = end
        out.sort(key=lambda item: item[0])
        return np.stack([v for _, v in out]) if out else np.zeros((0, 0), dtype=np.float32)


def read_lines(path: Path | None) -> list[str]:
    """The non-blank lines of a UTF-8 file (stdin for None or '-')."""
    if path is None or str(path) == "-":
        return [line for line in sys.stdin.read().splitlines() if line.strip()]
    path = Path(path).expanduser()
    lines = [line for line in read_text_file(path, "input file").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path} has no text (only blank lines)")
    return lines


def write_vectors(vectors: np.ndarray, texts: Sequence[str], out: Path | None, stdout: IO[str]) -> None:
    """.npy (one row per text) or JSON lines ({"text", "embedding"}) by --out's suffix; stdout: JSON lines."""
    from llmcli.io import atomic_write

    if out is not None and out.suffix == ".npy":
        def save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.save would add ".npy" to a path
                np.save(fh, vectors, allow_pickle=False)

        atomic_write(out, save)
        return
    lines = "".join(json.dumps({"text": t, "embedding": [round(float(x), 7) for x in v]}, ensure_ascii=False) + "\n"
                    for t, v in zip(texts, vectors, strict=True))
    if out is None:
        stdout.write(lines)
    else:
        atomic_write(out, lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def embed_command(opts: Any) -> None:
    """`llmcli embed RUN_DIR --input FILE --out vectors.npy|.jsonl`."""
    import time

    from llmcli.checkpoint import check_output_file
    from llmcli.device import configure_threads, select_device, select_dtype
    from llmcli.load import load_checkpoint

    if opts.out is not None:
        if opts.out.suffix not in (".npy", ".jsonl"):
            raise UserError(f"--out {opts.out}: give a .npy or .jsonl file")
        check_output_file(opts.out, opts.overwrite, {"--input": opts.input} if opts.input else {})
    texts = read_lines(opts.input)
    configure_threads(opts.threads)
    device = select_device(opts.device)
    loaded = load_checkpoint(opts.run_dir, device, select_dtype(opts.dtype, device))
    model = loaded.model
    embedder = Embedder(model, loaded.source_tokenizer or loaded.tokenizer)  # a seq2seq model embeds sources
    inputs = [embedder.ids(t, f"line {i + 1}") for i, t in enumerate(texts)]
    started = time.perf_counter()
    vectors = embedder.vectors(inputs)
    elapsed = time.perf_counter() - started
    write_vectors(vectors, texts, opts.out, sys.stdout)
    ui.log(f"{len(texts)} texts -> {vectors.shape[1]}-dimensional vectors ({model.pooling}) in {elapsed:.2f}s "
           f"({len(texts) / max(elapsed, 1e-9):.0f} texts/s)" + (f"; wrote {opts.out}" if opts.out else ""))
