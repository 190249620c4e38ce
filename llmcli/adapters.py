"""Several LoRA adapters on one base, chosen per row of a batch (`llmcli serve BASE --adapter NAME=RUN`).

Each adapter run's factors are read once (`lora.low_rank_factors`: the update of a weight is
exactly B @ A, alpha / r folded in) and stacked per adapted module, padded to the largest rank
with zeros (which adds nothing). The base's adapted modules are wrapped: a Linear adds
(x @ A[i]^T) @ B[i]^T for the adapter i of each row, an Embedding adds row i of its table's
update; index 0 is the base itself (zero factors). Rows of different adapters therefore share
one batch: the base weights are read once, and each row pays only its own low-rank product.

Which adapter each row uses comes from `Rows.adapters` (the engine sets it per request) through a
forward pre-hook on the model, or from `selected(...)` for calls without rows (embeddings). The
model family never knows: only its modules are wrapped.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from llmcli.errors import UserError
from llmcli.models.base import LanguageModel


@dataclass(frozen=True)
class AdapterSpec:
    """`--adapter NAME=RUN`: the model name requests use, and the adapter run."""

    name: str
    run: Path

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        name, sep, run = text.partition("=")
        if not sep or not name.strip() or not run.strip():
            raise UserError(f"--adapter {text!r}: give NAME=RUN (the model name clients use, then the adapter run)")
        return cls(name.strip(), Path(run.strip()).expanduser())


class _Selection(threading.local):
    """The adapter index of each row of the forward in progress on this thread (a [B] long tensor;
    None: the base). Per thread: serve embeds on one thread while the engine decodes on another."""

    rows: torch.Tensor | None = None
    fixed: torch.Tensor | None = None  # what calls without rows use (`Adapters.selected`)


class MultiLoRALinear(nn.Module):
    """A Linear plus one low-rank update per adapter, picked per row."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, selection: _Selection):
        super().__init__()
        self.base, self.selection = base, selection
        self.register_buffer("a", a, persistent=False)  # [adapters + 1, r, in]
        self.register_buffer("b", b, persistent=False)  # [adapters + 1, out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self.selection.rows
        if rows is None or not bool(rows.any()):
            return out
        a, b = self.a[rows].to(x.dtype), self.b[rows].to(x.dtype)  # [B, r, in], [B, out, r]
        low = torch.einsum("b...i,bri->b...r", x, a)
        return out + torch.einsum("b...r,bor->b...o", low, b).to(out.dtype)


class MultiLoRAEmbedding(nn.Module):
    """An Embedding plus one update of its table per adapter, picked per row."""

    def __init__(self, base: nn.Module, delta: torch.Tensor, selection: _Selection):
        super().__init__()
        self.base, self.selection = base, selection
        self.register_buffer("delta", delta, persistent=False)  # [adapters + 1, tokens, dim]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = self.base(idx)
        rows = self.selection.rows
        if rows is None or not bool(rows.any()):
            return out
        picked = self.delta[rows[:, None].expand_as(idx), idx]
        return out + picked.to(out.dtype)


class Adapters:
    """The adapters served on one base model, wrapped into it in place."""

    def __init__(self, model: LanguageModel, names: Sequence[str], factors: Sequence[dict[str, tuple]]):
        self.model, self.names = model, list(names)
        self.selection = _Selection()
        modules = sorted({name for f in factors for name in f})
        for module_name in modules:
            self._wrap(module_name, [f.get(module_name) for f in factors])
        model.register_forward_pre_hook(self._select_rows, with_kwargs=True)
        model.register_forward_hook(self._forget_rows)
        self.device = next(model.parameters()).device

    def index(self, name: str) -> int:
        """The adapter index of a model name (1..n; 0 is the base)."""
        return self.names.index(name) + 1

    def _wrap(self, module_name: str, pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        base = self.model.get_submodule(module_name)
        param = next(base.parameters())
        rank = max(b.shape[1] for pair in pairs if pair is not None for b in pair[:1])
        first = next(pair for pair in pairs if pair is not None)
        out_dim, in_dim = first[0].shape[0], first[1].shape[1]
        a = torch.zeros(len(pairs) + 1, rank, in_dim, device=param.device, dtype=torch.float32)
        b = torch.zeros(len(pairs) + 1, out_dim, rank, device=param.device, dtype=torch.float32)
        for i, pair in enumerate(pairs, start=1):
            if pair is not None:
                b_i, a_i = pair
                b[i, :, :b_i.shape[1]], a[i, :a_i.shape[0]] = b_i.to(param.device), a_i.to(param.device)
        if isinstance(base, nn.Embedding):
            wrapped: nn.Module = MultiLoRAEmbedding(base, torch.einsum("ntr,nrd->ntd", b, a), self.selection)
        else:
            wrapped = MultiLoRALinear(base, a, b, self.selection)
        parent, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapped)

    def _select_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        chosen = getattr(kwargs.get("rows"), "adapters", None)
        if chosen is not None and any(chosen):
            self.selection.rows = torch.tensor(chosen, dtype=torch.long, device=self.device)
        else:
            self.selection.rows = self.selection.fixed

    def _forget_rows(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.selection.rows = self.selection.fixed

    @contextlib.contextmanager
    def selected(self, indices: Sequence[int]) -> Iterator[None]:
        """Calls without rows inside (embeddings) use these adapters, one per batch row."""
        fixed = torch.tensor(list(indices), dtype=torch.long, device=self.device) if any(indices) else None
        self.selection.rows = self.selection.fixed = fixed
        try:
            yield
        finally:
            self.selection.rows = self.selection.fixed = None


def load_adapters(model: LanguageModel, base_dir: Path, specs: Sequence[AdapterSpec], device: torch.device,
                  dtype: torch.dtype) -> Adapters:
    """Read each adapter run (an adapter of `base_dir`, checked) and wrap `model` with them all."""
    from llmcli.checkpoint import adapter_base, is_adapter, load_unmerged, resolve_checkpoint
    from llmcli.lora import low_rank_factors

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"--adapter {twice}=...: the name is given twice")
    factors = []
    for spec in specs:
        directory = resolve_checkpoint(spec.run)
        if not is_adapter(directory):
            raise UserError(f"--adapter {spec.name}={spec.run}: not a LoRA adapter run (train one with "
                            "train.lora.r > 0 on this base)")
        if adapter_base(directory).resolve() != base_dir.resolve():
            raise UserError(f"--adapter {spec.name}={spec.run}: it adapts {adapter_base(directory)}, not the "
                            f"base served ({base_dir})")
        adapted = load_unmerged(directory, "cpu", torch.float32)
        factors.append({name: (b.to(device), a.to(device)) for name, (b, a) in low_rank_factors(adapted).items()})
        del adapted
    return Adapters(model, names, factors)
