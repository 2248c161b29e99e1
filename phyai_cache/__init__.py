"""phyai_cache: training-free caching for diffusion transformers, one config for every backend.

Importing this package changes nothing: caching happens only on targets passed to
:func:`enable_dit_cache` with an enabled config.
"""

from ._version import __version__
from .api import CacheHandle, disable_dit_cache, enable_dit_cache, get_cache_handle
from .blocks import BlockSpec
from .calibration import CalibrationResult, calibrate
from .config import DiTCacheConfig, list_presets, load_config
from .errors import (
                     BackendUnavailableError,
                     CacheStateError,
                     DistributedCacheError,
                     DiTCacheConfigError,
                     GraphCaptureError,
                     PhyaiCacheError,
                     RequestClosedError,
                     RequestFailedError,
)
from .registry import list_backends
from .requests import Request, Row
from .stats import BatchStats, RunStats, StepRecord
from .tuning import tune

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "BatchStats",
    "BlockSpec",
    "CacheHandle",
    "CacheStateError",
    "CalibrationResult",
    "DiTCacheConfig",
    "DiTCacheConfigError",
    "DistributedCacheError",
    "GraphCaptureError",
    "PhyaiCacheError",
    "Request",
    "RequestClosedError",
    "RequestFailedError",
    "Row",
    "RunStats",
    "StepRecord",
    "calibrate",
    "disable_dit_cache",
    "enable_dit_cache",
    "get_cache_handle",
    "list_backends",
    "list_presets",
    "load_config",
    "tune",
]

