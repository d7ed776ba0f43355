"""The training variants of what a provider runs (the ``train`` suite).

* :func:`forward_backward` — the op alone: its forward, then ``.backward()`` of a fixed
  upstream gradient, with gradients for the input and every weight;
* :func:`training_step` — a whole forecaster: forward, MSE loss against a fixed target,
  backward, one AdamW step.

Both free the gradients at the end of each call, so that every call starts from the same
state (no gradient held; AdamW's moment buffers, made by the first step, are) and its peak
memory (:func:`bench.measure.measure_peak_memory`) includes the gradients it makes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# AdamW's learning rate: the official CASA scripts' (its other settings are PyTorch's defaults).
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class Subject:
    """What a provider runs at one point: ``run(x)`` on its input ``x`` (``[B, N, D]`` for the
    op, ``[B, L, N]`` for a forecaster) and the tensors it learns (the op's 14 weights, or
    the forecaster's parameters)."""

    run: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    parameters: tuple[torch.Tensor, ...]


def forward_backward(subject: Subject, grad_output: torch.Tensor) -> Callable[[], None]:
    """A call running ``subject.run(x).backward(grad_output)``, leaving no gradient behind.

    ``x`` and every parameter are made leaves that require a gradient, so the backward
    computes all of them. ``grad_output`` has the shape of ``run(x)``.
    """
    leaves = (subject.x, *subject.parameters)
    for leaf in leaves:
        leaf.requires_grad_(True)

    def call() -> None:
        subject.run(subject.x).backward(grad_output)
        for leaf in leaves:
            leaf.grad = None

    return call


def training_step(subject: Subject, target: torch.Tensor) -> Callable[[], None]:
    """A call running one training step of the forecaster ``subject.run``: MSE loss of
    ``run(x)`` against ``target`` (``[B, H, N]``), backward, AdamW step, gradients freed."""
    optimizer = torch.optim.AdamW(subject.parameters, lr=LEARNING_RATE)

    def step() -> None:
        F.mse_loss(subject.run(subject.x), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
