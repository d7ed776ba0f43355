"""``nn.Module`` layer of CASA with the official state_dict layout (docs/design.md §3).

An official checkpoint of ``MLP_attention`` loads into :class:`CASABlock`, one of
``Model`` into :class:`CASAModel`, with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import weight_cache
from .ops.backends.cpu import linear as cpu_linear
from .ops.registry import Backend, check_backend_name
from .ops.score_attention import attention_on_backend
from .validation import (
    check_config,
    check_like_parameter,
    check_positive_int,
    check_series,
    check_tokens,
)
from .weights import ScoreAttentionWeights


class ScoreNetwork(nn.Module):
    """1D CNN autoencoder over the feature axis with variates as channels (official ``ScoreNetwork``).

    ``forward(x: [B, N, D]) -> [B, N, D]``: ``decoder(encoder(x)) + x``.
    """

    def __init__(self, *, n_vars: int, d_model: int, kernel: int = 3):
        super().__init__()
        check_config(n_vars=n_vars, d_model=d_model, kernel=kernel)
        c1, c2, p = d_model // 4, d_model // 2, kernel // 2
        self.n_vars, self.d_model, self.kernel = n_vars, d_model, kernel
        self.encoder = nn.Sequential(
            nn.Conv1d(n_vars, c1, kernel, stride=2, padding=p),
            nn.ReLU(),
            nn.Conv1d(c1, c2, kernel, stride=2, padding=p),
            nn.ReLU(),
            nn.Conv1d(c2, d_model, kernel, stride=2, padding=p),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose1d(d_model, c2, kernel, stride=2, padding=p, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose1d(c2, c1, kernel, stride=2, padding=p, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose1d(c1, n_vars, kernel, stride=2, padding=p, output_padding=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.n_vars, self.d_model)
        return self.decoder(self.encoder(x)) + x


class CASAAttention(nn.Module):
    """CASA attention over variates: ``softmax_N(score(x)) * value(x) + x``.

    ``forward(x: [B, N, D]) -> [B, N, D]``, N = ``n_vars``, D = ``d_model``.
    ``backend`` is passed to :func:`casa_kernels.casa_attention` on every call.
    """

    def __init__(self, *, n_vars: int, d_model: int, kernel: int = 3, backend: str = "auto"):
        super().__init__()
        check_config(n_vars=n_vars, d_model=d_model, kernel=kernel)
        check_backend_name(backend)
        self.n_vars, self.d_model, self.kernel, self.backend = n_vars, d_model, kernel, backend
        self.value = nn.Linear(d_model, d_model)
        self.score = ScoreNetwork(n_vars=n_vars, d_model=d_model, kernel=kernel)
        # Inference tensors carry no version counter: a load into them must be announced.
        self.register_load_state_dict_post_hook(_weights_loaded)

    def weights(self) -> ScoreAttentionWeights:
        """The parameters (live, not copies) in op order."""
        score = _child(self, "score")
        return _attention_weights(
            _child(self, "value"), _child(score, "encoder"), _child(score, "decoder")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x)[0]

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, Backend]:
        """The attention and the backend that ran it (whose capabilities a block may use)."""
        return attention_on_backend(x, self.weights(), self.backend)

    def extra_repr(self) -> str:
        return f"n_vars={self.n_vars}, d_model={self.d_model}, kernel={self.kernel}, backend={self.backend!r}"


class CASABlock(CASAAttention):
    """The official ``MLP_attention`` block: ``z = LN(attn(x))``, ``out = LN(MLP(z) + z)``.

    One LayerNorm instance is used twice, as in the official code.
    ``forward(x: [B, N, D], relu=False) -> [B, N, D]``; ``relu=True`` applies the ReLU that
    follows the block in the model (fused where the epilogue is). ``attention_options`` go
    to the attention's constructor (a subclass whose attention takes more options, e.g. a
    process group).

    Where the backend that ran the attention declares a fused block epilogue
    (``Backend.block_epilogue``, e.g. the cpu backend's) and the call is inference (no
    gradient due, no autocast, not traced), the work after the attention runs as that
    one fused op; elsewhere it is eager PyTorch.
    """

    def __init__(
        self,
        *,
        n_vars: int,
        d_model: int,
        kernel: int = 3,
        backend: str = "auto",
        **attention_options,
    ):
        super().__init__(
            n_vars=n_vars, d_model=d_model, kernel=kernel, backend=backend, **attention_options
        )
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        y, backend = self.attend(x)
        fused = self._fused_epilogue(y, backend)
        if fused is not None:
            return backend.block_epilogue.run(y, *fused, relu)
        z = self.norm(y)
        out = self.norm(self.mlp(z) + z)
        return torch.relu(out) if relu else out

    def _fused_epilogue(self, y: torch.Tensor, backend: Backend) -> tuple | None:
        """The arguments of ``backend``'s block epilogue after ``y`` where it runs, else None."""
        epilogue = backend.block_epilogue
        if epilogue is None or y.dtype not in epilogue.dtypes or torch.compiler.is_compiling():
            return None
        if torch.is_autocast_enabled(y.device.type):
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return None
        norm, mlp = _child(self, "norm"), _child(self, "mlp")
        linear0, _, linear2 = mlp
        norm_weight, norm_bias = _param(norm, "weight"), _param(norm, "bias")
        mlp0_weight, mlp0_bias = _param(linear0, "weight"), _param(linear0, "bias")
        mlp2_weight, mlp2_bias = _param(linear2, "weight"), _param(linear2, "bias")
        params = (norm_weight, norm_bias, mlp0_weight, mlp0_bias, mlp2_weight, mlp2_bias)
        if any(p is None or p.dtype != y.dtype for p in params):
            return None
        return norm_weight, norm_bias, norm.eps, mlp0_weight, mlp0_bias, mlp2_weight, mlp2_bias


class CASAModel(nn.Module):
    """The official CASA forecaster (``Model``).

    ``forward(x: [B, seq_len, n_vars]) -> [B, pred_len, n_vars]``: instance
    normalisation over time (mean, unbiased variance + 1e-5), ``Linear(L→D) → ReLU →
    [CASABlock → ReLU] × e_layers → Linear(D→H)`` on ``[B, N, L]``, de-normalisation.
    B may be 0 (an empty forecast). The blocks are ``block_type`` instances, built with
    ``block_options`` as extra keywords.

    The official call ``model(x_enc, x_mark_enc, x_dec, x_mark_dec, mask=None)`` of the
    paper's and the Time-Series-Library's training and evaluation loops works as it is:
    CASA uses ``x_enc`` alone and ignores the time marks, the decoder input and the mask.
    """

    block_type: type[CASABlock] = CASABlock

    def __init__(
        self,
        *,
        n_vars: int,
        d_model: int,
        kernel: int = 3,
        seq_len: int,
        pred_len: int,
        e_layers: int,
        backend: str = "auto",
        **block_options,
    ):
        super().__init__()
        check_config(n_vars=n_vars, d_model=d_model, kernel=kernel)
        for name, value in (("seq_len", seq_len), ("pred_len", pred_len), ("e_layers", e_layers)):
            check_positive_int(name, value)
        self.n_vars, self.seq_len, self.pred_len = n_vars, seq_len, pred_len
        blocks = [
            nn.Sequential(
                self.block_type(
                    n_vars=n_vars, d_model=d_model, kernel=kernel, backend=backend, **block_options
                ),
                nn.ReLU(),
            )
            for _ in range(e_layers)
        ]
        self.model = nn.Sequential(
            nn.Linear(seq_len, d_model), nn.ReLU(), *blocks, nn.Linear(d_model, pred_len)
        )
        # backend="reference" keeps PyTorch's own Linears for the embedding and the head.
        self._plain_linears = backend == "reference"

    def forward(
        self,
        x: torch.Tensor,
        x_mark_enc: object = None,
        x_dec: object = None,
        x_mark_dec: object = None,
        mask: object = None,
    ) -> torch.Tensor:
        check_series(x, self.seq_len, self.n_vars)
        embed, _, *layers, head = self.model  # model[1] is the embedding's ReLU, done in place
        if not torch.is_autocast_enabled(x.device.type):
            check_like_parameter("x", x, "model.0.weight", _param(embed, "weight"))
        if x.shape[0] == 0:  # no statistics of an empty batch to normalise with
            return x.new_empty(0, self.pred_len, self.n_vars)
        var, mean = torch.var_mean(x, dim=1, keepdim=True)  # one pass; var unbiased
        std = torch.sqrt(var + 1e-5)
        h = self._linear(embed, ((x - mean) / std).permute(0, 2, 1)).relu_()
        for block, _ in layers:  # each layer is (CASABlock, ReLU): the block applies the ReLU
            h = block(h, relu=True)
        return self._linear(head, h).permute(0, 2, 1) * std + mean

    def _linear(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """``layer(h)``; a plain ``nn.Linear`` on bfloat16 CPU input goes through the cpu
        backend's ``linear`` (fp32 GEMMs where the CPU has no bfloat16 ones)."""
        plain = (
            self._plain_linears
            or h.dtype != torch.bfloat16
            or h.device.type != "cpu"
            or type(layer) is not nn.Linear
            or layer._forward_hooks
            or layer._forward_pre_hooks
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()
        )
        if plain:
            return layer(h)
        return cpu_linear(h, _param(layer, "weight"), _param(layer, "bias"))


# Parameters and submodules are looked up in the module's own dicts on every call:
# nn.Module.__getattr__ costs about 1 us each, some 40 a block (docs/design.md §11.5).


def _weights_loaded(module: nn.Module, incompatible_keys) -> None:
    weight_cache.invalidate()


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>``: the registered parameter, else the attribute (a parametrized or
    pruned weight is not a registered parameter)."""
    p = module._parameters.get(name)
    return p if p is not None else getattr(module, name)


def _child(module: nn.Module, name: str) -> nn.Module:
    """``module.<name>`` for a registered submodule."""
    child = module._modules.get(name)
    return child if child is not None else getattr(module, name)


def _attention_weights(
    value: nn.Linear, encoder: nn.Sequential, decoder: nn.Sequential
) -> ScoreAttentionWeights:
    enc0, _, enc1, _, enc2, _ = encoder  # by iteration: a Sequential's indexing is slow
    dec0, _, dec1, _, dec2, _ = decoder
    return ScoreAttentionWeights(
        *(
            _param(m, name)
            for m in (value, enc0, enc1, enc2, dec0, dec1, dec2)
            for name in ("weight", "bias")
        )
    )
