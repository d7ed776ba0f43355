"""The static GPU cost model (docs/design.md §15): ``python -m bench estimate``.

Modules, one job each: :mod:`.triton_compile` (the triton backend's launches recorded and
compiled for sm_90a as their launchers would launch them), :mod:`.triton_side` and
:mod:`.cuda_side` (each backend's launches compiled, read back and described as work),
:mod:`.sass` (cuobjdump output parsed), :mod:`.occupancy` (blocks per SM, waves),
:mod:`.timing` (one launch's estimated time), :mod:`.hardware` (the GPU's numbers and the
model's assumptions), :mod:`.model` (per-kernel rows, totals, the op's floors),
:mod:`.report` (estimate.md) and :mod:`.cli` (the command).
"""
