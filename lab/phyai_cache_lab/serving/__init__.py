"""A reference step-level serving loop over the shipped reference model.

It drives a DiT the way a latency-first serving engine does (phyai's engine is the model; see
docs/serving.md): requests arrive over time, each with its own cache tier; every step, the current
denoising step of up to ``max_rows`` rows of several requests runs as *one* transformer call; new
requests are admitted between steps and finished ones retired. With a cache handle, each request is
a :class:`phyai_cache.Request` and each call a :meth:`CacheHandle.batch`, so every row is decided on
its own and the middle blocks run only on the rows that must compute.

``phyai-cache serve`` runs one trace; ``phyai-cache bench serving`` compares no cache, per-batch
decisions and per-row decisions on the same trace.
"""

from .engine import Completed, ServeRequest, StepEngine
from .trace import TIERS, make_trace

__all__ = ["Completed", "ServeRequest", "StepEngine", "TIERS", "make_trace"]
