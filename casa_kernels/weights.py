"""The parameters of one CASA attention, in the order of the op schema.

Shapes (N = variates, D = d_model, k = kernel, C1 = D/4, C2 = D/2), exactly the
layouts of ``nn.Linear``, ``nn.Conv1d`` and ``nn.ConvTranspose1d``:

=================  ===============  ==================================
field              shape            official state_dict name
=================  ===============  ==================================
value_weight       [D, D]           value.weight
value_bias         [D]              value.bias
enc0_weight        [C1, N, k]       score.encoder.0.weight
enc0_bias          [C1]             score.encoder.0.bias
enc1_weight        [C2, C1, k]      score.encoder.2.weight
enc1_bias          [C2]             score.encoder.2.bias
enc2_weight        [D, C2, k]       score.encoder.4.weight
enc2_bias          [D]              score.encoder.4.bias
dec0_weight        [D, C2, k]       score.decoder.0.weight
dec0_bias          [C2]             score.decoder.0.bias
dec1_weight        [C2, C1, k]      score.decoder.2.weight
dec1_bias          [C1]             score.decoder.2.bias
dec2_weight        [C1, N, k]       score.decoder.4.weight
dec2_bias          [N]              score.decoder.4.bias
=================  ===============  ==================================
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def weight_shapes(n_vars: int, d_model: int, kernel: int) -> dict[str, tuple[int, ...]]:
    """The shape of every field of :class:`ScoreAttentionWeights`, in field order."""
    n, d, k = n_vars, d_model, kernel
    c1, c2 = d // 4, d // 2
    return {
        "value_weight": (d, d),
        "value_bias": (d,),
        "enc0_weight": (c1, n, k),
        "enc0_bias": (c1,),
        "enc1_weight": (c2, c1, k),
        "enc1_bias": (c2,),
        "enc2_weight": (d, c2, k),
        "enc2_bias": (d,),
        "dec0_weight": (d, c2, k),
        "dec0_bias": (c2,),
        "dec1_weight": (c2, c1, k),
        "dec1_bias": (c1,),
        "dec2_weight": (c1, n, k),
        "dec2_bias": (n,),
    }


class ScoreAttentionWeights(NamedTuple):
    value_weight: torch.Tensor
    value_bias: torch.Tensor
    enc0_weight: torch.Tensor
    enc0_bias: torch.Tensor
    enc1_weight: torch.Tensor
    enc1_bias: torch.Tensor
    enc2_weight: torch.Tensor
    enc2_bias: torch.Tensor
    dec0_weight: torch.Tensor
    dec0_bias: torch.Tensor
    dec1_weight: torch.Tensor
    dec1_bias: torch.Tensor
    dec2_weight: torch.Tensor
    dec2_bias: torch.Tensor

    @property
    def n_vars(self) -> int:
        return self.enc0_weight.shape[1]

    @property
    def d_model(self) -> int:
        return self.value_weight.shape[0]

    @property
    def kernel(self) -> int:
        return self.enc0_weight.shape[2]

    def to(self, *args, **kwargs) -> ScoreAttentionWeights:
        return ScoreAttentionWeights(*(w.to(*args, **kwargs) for w in self))

    @classmethod
    def random(
        cls,
        n_vars: int,
        d_model: int,
        kernel: int = 3,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> ScoreAttentionWeights:
        """Weights drawn like PyTorch's default init: uniform in +-1/sqrt(fan_in).

        fan_in is ``weight.size(1) * k`` for convolutions (also transposed ones, as
        PyTorch computes it) and D for the value projection; biases share their
        weight's bound.
        """
        tensors = []
        bound = 1.0
        for name, shape in weight_shapes(n_vars, d_model, kernel).items():
            if name.endswith("_weight"):
                fan_in = shape[1] * (shape[2] if len(shape) == 3 else 1)
                bound = fan_in**-0.5
            t = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
            tensors.append((t * bound).to(dtype=dtype, device=device))
        return cls(*tensors)
