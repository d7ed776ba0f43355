"""Variate-parallel CASA on torch.distributed (docs/design.md §12): one model over many processes.

Variates are split over the ranks of a process group in contiguous balanced ranges
(:func:`variate_range`). Each rank holds its variates' slices of the per-variate
parameters and a replica of the rest; a layer all-reduces only the encoder head's
partial sums ``[B, D/4, D/2]`` and the softmax column statistics (two ``[B, D]``), so
communication does not grow with N. gloo on CPU, NCCL on GPU; the same code.

Typical use (under ``torchrun``)::

    torch.distributed.init_process_group("gloo")
    model = VariateParallelCASAModel.from_state_dict("casa.pt")   # this rank's slices only
    x_local = x[:, :, model.shard.variates.start:model.shard.variates.stop]
    with model.ends_group_on_failure():       # a failure in the step ends every rank at once
        y_local = model(x_local)              # [B, H, N_local]
        loss(y_local).backward()
        model.sync_replicated_grads()
        optimizer.step()

The ranks must agree (configuration, replicated weights, each call's batch size, dtype
and mode): every call checks that first (:class:`VariateParallelMismatch` on every rank).
"""

from .agreement import VariateParallelMismatch
from .attention import communicated_elements, variate_parallel_attention
from .failure import VariateParallelFailure, VariateParallelTimeout
from .modules import (
    VariateParallel,
    VariateParallelCASAAttention,
    VariateParallelCASABlock,
    VariateParallelCASAModel,
    shard_model,
)
from .partition import VariateShard, variate_range

__all__ = [
    "VariateParallel",
    "VariateParallelCASAAttention",
    "VariateParallelCASABlock",
    "VariateParallelCASAModel",
    "VariateParallelFailure",
    "VariateParallelMismatch",
    "VariateParallelTimeout",
    "VariateShard",
    "communicated_elements",
    "shard_model",
    "variate_parallel_attention",
    "variate_range",
]
