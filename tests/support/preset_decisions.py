"""Per-step decisions of every shipped preset on the reference model, pinned in tests/data.

``record()`` runs each preset at 20 steps (seed 0, batch 4) with and without true CFG and returns
(step, branch, decision, reason, diff) per transformer call. ``python tests/support/preset_decisions.py``
rewrites the pinned file; tests/test_decisions_pinned.py compares a fresh recording against it, so a
refactor of the decision path that changes any decision fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from phyai_cache import disable_dit_cache, enable_dit_cache, list_presets
from phyai_cache_lab import reference

PINNED = Path(__file__).resolve().parents[1] / "data" / "preset_decisions.json"
CASES = {"plain": None, "cfg": 3.0}
# Beyond the presets: the shared-CFG (leader/follower) path and dbcache with a forecaster, per backend.
EXTRAS = {
    f"{backend}-shared-cfg": dict(enabled=True, backend=backend, strategy="fbcache", threshold=0.3,
                                  warmup_steps=1, separate_cfg=False, max_consecutive_cached=3)
    for backend in ("native", "diffusers", "cache_dit")
}
EXTRAS["native-dbcache-capped"] = dict(enabled=True, backend="native", strategy="dbcache", threshold=0.5,
                                       front_blocks=2, back_blocks=1, taylorseer_order=2, max_cached_steps=6,
                                       active_steps=(3, 17))


def record() -> dict[str, list]:
    torch.manual_seed(0)
    pipe = reference.load_pipeline()
    labels = [0, 3, 7, 9]
    out: dict[str, list] = {}
    configs = {name: name for name in list_presets()} | EXTRAS
    for name, config in configs.items():
        handle = enable_dit_cache(pipe, config)
        try:
            for case, cfg in CASES.items():
                pipe(**reference.call_kwargs(labels, num_inference_steps=20, seed=0, cfg_scale=cfg))
                out[f"{name}/{case}"] = [
                    [r.step, r.branch, r.decision, r.reason, None if r.diff is None else round(r.diff, 6)]
                    for r in handle.last_run.records
                ]
        finally:
            disable_dit_cache(pipe)
    return out


if __name__ == "__main__":
    PINNED.write_text(json.dumps(record(), indent=0) + "\n")
    print(f"wrote {PINNED}")
