"""Input checks for every entry point a user reaches.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, size or device) with a message naming the argument, what was expected
and what was received. Nothing is broadcast, truncated or cast.
"""

from __future__ import annotations

import torch

from .weights import ScoreAttentionWeights, weight_shapes


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, received {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, received {value}")


def check_config(*, n_vars: int, d_model: int, kernel: int) -> None:
    """Checks constructor hyper-parameters: positive ints, D % 8 == 0, odd kernel."""
    for name, value in (("n_vars", n_vars), ("d_model", d_model), ("kernel", kernel)):
        check_positive_int(name, value)
    if d_model % 8 != 0:
        raise ValueError(
            f"d_model: expected a multiple of 8 (three stride-2 convolutions halve it), "
            f"received {d_model}"
        )
    if kernel % 2 != 1:
        raise ValueError(f"kernel: expected an odd size, received {kernel}")


def check_floating_tensor(
    name: str, t: object, ndim: int, layout: str, *, empty_batch: bool = False
) -> torch.Tensor:
    """Checks ``t`` is a non-empty floating tensor of rank ``ndim`` (layout names the dims).

    With ``empty_batch``, a size of 0 in dim 0 alone is accepted (every other dim must be
    non-zero), as PyTorch's own layers accept an empty batch.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, received {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, received dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-D tensor {layout}, received shape {tuple(t.shape)}"
        )
    if 0 in (t.shape[1:] if empty_batch else t.shape):
        what = "non-zero sizes after the batch dim" if empty_batch else "a non-empty tensor"
        raise ValueError(f"{name}: expected {what} {layout}, received shape {tuple(t.shape)}")
    return t


def check_dim(name: str, t: torch.Tensor, dim: int, dim_name: str, expected: int) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected {dim_name} = {expected} (dim {dim}), received shape {tuple(t.shape)}"
        )


def check_tokens(x: object, n_vars: int, d_model: int) -> torch.Tensor:
    """Checks ``x`` is a floating ``[batch, n_vars, d_model]`` tensor (batch may be 0)."""
    x = check_floating_tensor("x", x, 3, "[batch, n_vars, d_model]", empty_batch=True)
    check_dim("x", x, 1, "n_vars", n_vars)
    check_dim("x", x, 2, "d_model", d_model)
    return x


def check_series(x: object, seq_len: int, n_vars: int) -> torch.Tensor:
    """Checks ``x`` is a floating ``[batch, seq_len, n_vars]`` tensor (batch may be 0)."""
    x = check_floating_tensor("x", x, 3, "[batch, seq_len, n_vars]", empty_batch=True)
    check_dim("x", x, 1, "seq_len", seq_len)
    check_dim("x", x, 2, "n_vars", n_vars)
    return x


def check_weights(weights: object) -> ScoreAttentionWeights:
    """Checks every field's type, shape, dtype and device against ``enc0_weight``/``value_weight``."""
    if not isinstance(weights, ScoreAttentionWeights):
        raise TypeError(
            f"weights: expected a ScoreAttentionWeights, received {type(weights).__name__}"
        )
    for name, w in zip(weights._fields, weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights.{name}: expected a torch.Tensor, received {type(w).__name__}")
    ref = weights.value_weight
    if weights.enc0_weight.dim() != 3:
        raise ValueError(
            f"weights.enc0_weight: expected a 3-D tensor [d_model/4, n_vars, kernel], "
            f"received shape {tuple(weights.enc0_weight.shape)}"
        )
    if ref.dim() != 2:
        raise ValueError(
            f"weights.value_weight: expected a 2-D tensor [d_model, d_model], "
            f"received shape {tuple(ref.shape)}"
        )
    check_config(n_vars=weights.n_vars, d_model=weights.d_model, kernel=weights.kernel)
    shapes = weight_shapes(weights.n_vars, weights.d_model, weights.kernel).values()
    dtype, device = ref.dtype, ref.device
    for name, w, shape in zip(weights._fields, weights, shapes):
        if w.shape != shape:  # torch.Size is a tuple
            raise ValueError(f"weights.{name}: expected shape {shape}, received {tuple(w.shape)}")
        if w.dtype != dtype:
            raise TypeError(
                f"weights.{name}: expected dtype {dtype} (that of value_weight), received {w.dtype}"
            )
        if w.device != device:
            raise ValueError(
                f"weights.{name}: expected device {device} (that of value_weight), "
                f"received {w.device}"
            )
    return weights


def check_attention_input(x: object, weights: ScoreAttentionWeights) -> torch.Tensor:
    """Checks ``x: [B, N, D]`` against already-checked weights: sizes, dtype, device."""
    return check_like_weights(check_tokens(x, weights.n_vars, weights.d_model), weights)


def check_like_parameter(
    name: str, x: torch.Tensor, parameter_name: str, parameter: torch.Tensor
) -> torch.Tensor:
    """Checks the dtype and device of ``x`` (sizes already checked) against a parameter's."""
    if x.dtype != parameter.dtype:
        raise TypeError(
            f"{name}: expected dtype {parameter.dtype} (that of {parameter_name}), received {x.dtype}"
        )
    if x.device != parameter.device:
        raise ValueError(
            f"{name}: expected device {parameter.device} (that of {parameter_name}), "
            f"received {x.device}"
        )
    return x


def check_like_weights(x: torch.Tensor, weights: ScoreAttentionWeights) -> torch.Tensor:
    """Checks the dtype and device of ``x`` (sizes already checked) against the weights'."""
    return check_like_parameter("x", x, "the weights", weights.value_weight)
