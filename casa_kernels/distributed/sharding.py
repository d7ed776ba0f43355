"""Which parameters are per-variate, and a rank's slices of them cut from a state_dict.

Per-variate (sharded over ranks, sliced along the variate axis):

==========================  ==================  ==========
name (suffix)               full shape          variate dim
==========================  ==================  ==========
``score.encoder.0.weight``  ``[C1, N, k]``      1
``score.decoder.4.weight``  ``[C1, N, k]``      1
``score.decoder.4.bias``    ``[N]``             0
==========================  ==================  ==========

Every other parameter (value projection, the four middle convs and their biases, the
first conv's bias, MLP, LayerNorm, embedding and head) is replicated on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .partition import VariateShard

# name suffix -> the dim that indexes variates
SHARDED_DIMS = {"score.encoder.0.weight": 1, "score.decoder.4.weight": 1, "score.decoder.4.bias": 0}


def variate_dim(name: str) -> int | None:
    """The variate dim of the parameter called ``name`` (any prefix), None if it is replicated."""
    for suffix, dim in SHARDED_DIMS.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def _owned_copy(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """A contiguous copy of ``t`` in a storage of exactly its size (never a view of ``t``'s storage)."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device if device is None else device)
    return out.copy_(t)


def local_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    shard: VariateShard,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's state_dict: per-variate tensors sliced to ``shard.variates``, the rest whole.

    Every tensor is copied into storage of its own (so a memory-mapped checkpoint is only
    read where this rank's slices lie, and nothing keeps the full tensors alive).
    Raises ``ValueError`` when a per-variate tensor's variate dim is not ``shard.n_vars``.
    """
    local = {}
    for name, t in state_dict.items():
        dim = variate_dim(name)
        if dim is not None:
            if t.dim() <= dim or t.shape[dim] != shard.n_vars:
                raise ValueError(
                    f"state_dict[{name!r}]: expected n_vars = {shard.n_vars} variates along dim {dim}, "
                    f"received shape {tuple(t.shape)}"
                )
            t = t.narrow(dim, shard.variates.start, shard.n_local)
        local[name] = _owned_copy(t, device)
    return local


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save``'d state_dict, memory-mapped (``mmap=True``): no tensor is read yet."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _entry(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"state_dict: expected the official CASAModel key {key!r} (docs/design.md §3), it is missing"
        )
    return state_dict[key]


def model_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``n_vars, d_model, kernel, seq_len, pred_len, e_layers`` of the CASAModel whose state_dict this is.

    Read from shapes only (``model.0.weight`` ``[D, L]``, the first block's
    ``score.encoder.0.weight`` ``[C1, N, k]``, the head ``[H, D]``), so memory-mapped
    tensors are not read.
    """
    e_layers = 0
    while f"model.{e_layers + 2}.0.value.weight" in state_dict:
        e_layers += 1
    embed = _entry(state_dict, "model.0.weight")
    enc0 = _entry(state_dict, "model.2.0.score.encoder.0.weight")
    head = _entry(state_dict, f"model.{e_layers + 2}.weight")
    return dict(
        n_vars=enc0.shape[1],
        d_model=embed.shape[0],
        kernel=enc0.shape[2],
        seq_len=embed.shape[1],
        pred_len=head.shape[0],
        e_layers=e_layers,
    )
