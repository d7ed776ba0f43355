"""Benchmarks of casa_kernels: ``python -m bench {attention,scaling,model,train} --help``.

Modules, one job each:

* :mod:`bench.providers` — what is timed (CASA backends, torch.compile, full attention) and
  whether it can run here;
* :mod:`bench.training` — the training variants of what a provider runs (the op's
  forward+backward, the forecaster's training step);
* :mod:`bench.measure` — latency percentiles and peak extra memory of one callable;
* :mod:`bench.suites` — the points of each suite and the loop that measures them;
* :mod:`bench.results` — result rows, the upserted CSV, the device name;
* :mod:`bench.summary` — fitted log–log slopes, crossovers, largest N reached;
* :mod:`bench.plots` — log–log PNG figures of the scaling suite and of training memory;
* :mod:`bench.report` — the results page ``README.md`` of a results folder, from its CSVs
  (``python -m bench report``).

Speed is measured here only; ``tests/`` holds no timed tests.
"""
