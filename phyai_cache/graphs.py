"""CUDA graphs and caching: a cache decision is never frozen into a captured graph.

A cache decides in Python, between blocks, on every step. A CUDA graph records the kernels that ran
while it was captured and replays exactly those. Capturing a cached transformer call would
therefore record one step's decision forever: every replay computes all blocks (no caching at all)
or adds the residual that was cached at capture time (wrong images), silently. So a cached call
refuses to run while the current CUDA stream is capturing; uncached calls (outside a run) are not
affected, and capturing an uncached model is fine.

Ways to combine caching with graphs, described in docs/architecture.md ("CUDA graphs: capturable
regions"): keep the cached transformer eager or regionally compiled (``block.compile()``,
``transformer.compile_repeated_blocks()``), and capture graphs only of uncached calls; or capture
per region (front blocks, middle, back blocks) with the decision kept on the host between regions.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import GraphCaptureError

GUIDE = "docs/architecture.md, section 'CUDA graphs: capturable regions'"


def stream_is_capturing() -> bool:
    """True while the calling thread's current CUDA stream is being captured into a graph.

    Capture needs an initialised CUDA context, so a process that never initialised CUDA (every
    CPU-only run) answers with one flag check and never touches the CUDA runtime.
    """
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def refuse_capture(where: str, *args: object) -> None:
    """Raise :class:`GraphCaptureError` if a cached call site runs under graph capture.

    ``where % args`` names the call site; it is formatted only when raising, so the check stays a
    flag test on hot paths (every block call of a cached run).
    """
    if stream_is_capturing():
        raise GraphCaptureError(
            f"phyai_cache: {where % args if args else where} while a CUDA graph is being captured on "
            "the current stream. The graph would replay the cache decision taken during capture on "
            "every replay (always computing, or always reusing the residual cached at capture time), "
            "so the cached call is refused. Fix: capture only uncached calls (outside a pipeline call "
            "or handle.run(), or after disable_dit_cache) and run the cached model eagerly or with "
            "regional torch.compile (block.compile() / transformer.compile_repeated_blocks()); an "
            f"engine that captures per region keeps the decision between its graphs: see {GUIDE}"
        )


def cached_tensors(handle: Any) -> dict[str, torch.Tensor]:
    """The tensors the cache of ``handle`` holds right now, by path; empty outside a run.

    These are what an engine capturing per region would keep in static slots (see GUIDE): for the
    native engine, per branch, the decision residual and each segment's residual (with TaylorSeer,
    its factors). Found by walking the run's backend state, so the paths follow the engine's own
    attribute names; modules are not entered (they hold weights, not cache).
    """
    lifecycle = getattr(handle, "_lifecycle", None)
    run = lifecycle.run_state if lifecycle is not None else None
    runs = getattr(lifecycle.installation, "runs", None) if lifecycle is not None else None
    found: dict[str, torch.Tensor] = {}
    if run is not None and runs is not None:
        _collect(runs[run], "state", found, set())
    return found


def _collect(obj: Any, path: str, found: dict[str, torch.Tensor], seen: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        found[path] = obj
        return
    if obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.nn.Module)) or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        children = ((f"{path}[{key!r}]", value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        children = ((f"{path}[{index}]", value) for index, value in enumerate(obj))
    elif hasattr(obj, "__dict__"):
        children = ((f"{path}.{name}", value) for name, value in vars(obj).items())
    else:
        return
    for child_path, child in children:
        _collect(child, child_path, found, seen)
