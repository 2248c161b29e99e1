"""The quality/speed benchmark of cache configs on the shipped reference models, and its commands.

- :func:`run_bench` sweeps every available backend x strategy of the registry (plus the shipped
  presets) against the uncached pipeline, timing interleaved pairs, and returns a
  :class:`BenchReport`; :mod:`.report` and :mod:`.figures` write JSON, Markdown and PNGs.
- :mod:`.demo` runs one config against the uncached pipeline in detail (``phyai-cache demo``).
- :mod:`.cli` is ``phyai-cache bench``, ``phyai-cache tune`` and ``phyai-cache calibrate`` on the
  reference models. The tuner itself (:func:`phyai_cache.tune`), the timing in interleaved pairs and
  the metrics are library code (:mod:`phyai_cache.tuning`): users tune their own pipelines with it.
"""

from .runner import BenchOptions, BenchReport, BenchRow, run_bench
from .sweep import SweepEntry, plan_sweep
from .workload import Workload, reference_workload

__all__ = [
    "BenchOptions",
    "BenchReport",
    "BenchRow",
    "SweepEntry",
    "Workload",
    "plan_sweep",
    "reference_workload",
    "run_bench",
]
