"""The Triton kernels of a GPU run compiled ahead of time on the CPU, carried to the GPU
machine as a cache (docs/design.md §7).

``python -m bench.triton_aot build OUT`` (here, with the GPU machine's Triton release)
plans every kernel the device check's steps launch (:mod:`.steps`, :mod:`.calls`) and
compiles them into OUT; ``install`` (there) re-keys them into that machine's Triton
cache; ``compiled`` counts what that machine compiled itself. Modules: :mod:`.calls`
(recording and replaying launcher calls), :mod:`.steps` (each step's calls),
:mod:`.cache` (plan, build, install, count).
"""
