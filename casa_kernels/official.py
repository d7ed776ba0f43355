"""Drop-in classes for the paper's training harness (github lmh9507/CASA, ``models/CASA.py``).

Replacing the body of the official ``models/CASA.py`` with::

    from casa_kernels.official import MLP_attention, Model, ScoreNetwork  # noqa: F401

trains and evaluates with the fused kernels, unchanged otherwise: ``Model(configs)``
takes the ``argparse`` namespace the official ``run.py`` builds, the official call
``model(x_enc, x_mark_enc, x_dec, x_mark_dec)``, and saves and loads the official
state_dict (``strict=True`` both ways). From ``configs`` it reads ``seq_len``,
``pred_len``, ``enc_in``, ``d_model``, ``e_layers`` and ``kernel`` (3 where absent, as
run.py's default), and an optional ``backend`` (``"auto"`` where absent); every other
field run.py passes (``d_ff``, ``dropout``, ``use_norm``, ...) is one CASA does not use.
"""

from __future__ import annotations

from .modules import CASABlock, CASAModel
from .modules import ScoreNetwork as _ScoreNetwork

_REQUIRED = ("seq_len", "pred_len", "enc_in", "d_model", "e_layers")
_DEFAULTS = {"kernel": 3, "backend": "auto"}


def _field(configs: object, name: str):
    if hasattr(configs, name):
        return getattr(configs, name)
    if name in _DEFAULTS:
        return _DEFAULTS[name]
    raise AttributeError(
        f"configs: expected a field {name!r} (the official run.py's --{name}), "
        f"received a {type(configs).__name__} without it"
    )


class Model(CASAModel):
    """The official ``Model(configs)``: ``[B, seq_len, enc_in] -> [B, pred_len, enc_in]``."""

    def __init__(self, configs: object):
        values = {name: _field(configs, name) for name in (*_REQUIRED, *_DEFAULTS)}
        super().__init__(
            n_vars=values["enc_in"],
            d_model=values["d_model"],
            kernel=values["kernel"],
            seq_len=values["seq_len"],
            pred_len=values["pred_len"],
            e_layers=values["e_layers"],
            backend=values["backend"],
        )
        self.enc_in, self.d_model = values["enc_in"], values["d_model"]


class MLP_attention(CASABlock):  # noqa: N801 - the official class name
    """The official ``MLP_attention(d_model, enc_in, kernel)``: :class:`CASABlock`."""

    def __init__(self, d_model: int, enc_in: int, kernel: int, backend: str = "auto"):
        super().__init__(n_vars=enc_in, d_model=d_model, kernel=kernel, backend=backend)


class ScoreNetwork(_ScoreNetwork):
    """The official ``ScoreNetwork(enc_in, d_model, kernel=3)``."""

    def __init__(self, enc_in: int, d_model: int, kernel: int = 3):
        super().__init__(n_vars=enc_in, d_model=d_model, kernel=kernel)
