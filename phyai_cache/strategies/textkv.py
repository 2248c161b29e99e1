"""textkv: exact reuse of the text tokens' attention keys and values across steps (diffusers' TextKVCache).

Lossless: the text K/V projections of a prompt are the same at every step, so they are computed
once per block and prompt. No threshold, nothing approximated, every block still runs. diffusers
implements it for NucleusMoE-Image only (phyai_cache/adapters/diffusers/textkv.py).
"""

from . import StrategySpec

SPEC = StrategySpec(
    name="textkv",
    summary="exact: compute the text keys/values once per prompt and reuse them (diffusers' TextKVCache)",
    fields=(),
    backends=("diffusers",),
    not_served={"native": "the native engine caches block outputs, not attention inputs (textkv: backend diffusers)",
                "cache_dit": "cache-dit does not implement a text K/V cache"},
)
