"""How a magnitude-pruned checkpoint stores its sparse weights: the nonzero values and a bitmask.

A weight `W` with zeros is stored as `W.sparse_values` (its nonzero entries in row-major order, in
W's dtype) and `W.sparse_mask` (one bit per entry, packed eight to a byte, uint8), instead of the
dense tensor, whenever that is smaller; loading puts the values back into a dense tensor of the
shape the model config implies. At 50% sparsity a float32 weight takes 2.125 bytes an entry, not 4.
"""

from __future__ import annotations

import numpy as np
import torch

VALUES, MASK = ".sparse_values", ".sparse_mask"


def pack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each floating tensor that has enough zeros replaced by its values + mask."""
    out = {}
    for name, tensor in tensors.items():
        nonzero = int(torch.count_nonzero(tensor)) if tensor.is_floating_point() and tensor.dim() >= 2 else -1
        if nonzero < 0 or nonzero * tensor.element_size() + tensor.numel() / 8 >= tensor.numel() * tensor.element_size():
            out[name] = tensor
            continue
        mask = tensor.flatten() != 0
        out[name + VALUES] = tensor.flatten()[mask].contiguous()
        out[name + MASK] = torch.from_numpy(np.packbits(mask.cpu().numpy(), bitorder="little"))
    return out


def unpack(tensors: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Dense tensors again, of the `shapes` the model expects; ValueError if a pair does not fit."""
    out = {name: t for name, t in tensors.items() if not name.endswith((VALUES, MASK))}
    for key, values in tensors.items():
        if not key.endswith(VALUES):
            continue
        name = key[: -len(VALUES)]
        if name + MASK not in tensors or name not in shapes:
            raise ValueError(f"{key} has no {name + MASK} or names no weight of the model")
        numel = int(np.prod(shapes[name]))
        bits = np.unpackbits(tensors[name + MASK].cpu().numpy(), count=numel, bitorder="little").astype(bool)
        if int(bits.sum()) != values.numel():
            raise ValueError(f"{name}: its mask marks {int(bits.sum())} entries but it stores {values.numel()}")
        dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
        dense[torch.from_numpy(bits).to(values.device)] = values
        out[name] = dense.view(shapes[name])
    return out
