"""Counting host syncs by what torch executes, on any device (CPU included).

A host sync is a point where Python waits for the device: reading a value back (``.item()``,
``float(t)``, ``int(t)``, ``bool(t)``, ``.tolist()``), an op whose output size depends on the values
(``nonzero``, ``masked_select``, ``unique``), ``torch.equal``, or a copy from a device to the CPU.
On a GPU each one drains the launch queue; inside CUDA-graph capture each one is illegal.

The counter sees the aten ops themselves (a ``TorchDispatchMode``), so it finds syncs whichever
function asks for them, including torch's own C++ code; ``.tolist()`` is counted at the Python
level because on a CPU tensor it reads memory without dispatching an op. On a CPU-only machine it
therefore counts the syncs a GPU run *would* make, which is what tests need.

Usage::

    with HostSyncCounter(pipe.transformer) as syncs:
        pipe(**kwargs)
    syncs.total          # every sync while the counter was active
    syncs.per_call       # syncs inside each call of pipe.transformer, in call order
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that cannot finish without the host reading device memory (value or output size).
_SYNCING_OPS = frozenset({
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t), is_nonzero
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
})


class HostSyncCounter:
    """Counts host syncs while active; with ``module``, also per call of that module."""

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        self.module = module
        self.total = 0
        self.per_call: list[int] = []
        self.ops: list[str] = []  # the syncing op of every counted sync, in order
        self._mode = _SyncDispatchMode(self)
        self._call_depth = 0  # > 0 inside a call of module; nested calls count for the outermost
        self._tolist_depth = 0
        self._hooks: list[Any] = []
        self._saved_tolist: Any = None

    def record(self, op: str) -> None:
        if self._tolist_depth:  # the copy or read that .tolist() does itself: already counted
            return
        self.total += 1
        self.ops.append(op)
        if self._call_depth:
            self.per_call[-1] += 1

    def __enter__(self) -> HostSyncCounter:
        self._install_tolist()
        if self.module is not None:
            self._hooks = [
                self.module.register_forward_pre_hook(self._call_started),
                self.module.register_forward_hook(self._call_ended, always_call=True),
            ]
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._mode.__exit__(*exc_info)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        torch.Tensor.tolist = self._saved_tolist

    def _call_started(self, module: torch.nn.Module, args: tuple) -> None:
        if self._call_depth == 0:
            self.per_call.append(0)
        self._call_depth += 1

    def _call_ended(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._call_depth -= 1

    def _install_tolist(self) -> None:
        counter = self
        original = self._saved_tolist = torch.Tensor.tolist

        def tolist(tensor: torch.Tensor) -> Any:
            counter.record("tolist")
            counter._tolist_depth += 1
            try:
                return original(tensor)
            finally:
                counter._tolist_depth -= 1

        torch.Tensor.tolist = tolist


class _SyncDispatchMode(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _SYNCING_OPS or _copies_to_host(func, args, kwargs):
            self.counter.record(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


def _copies_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """A copy from a non-CPU device into CPU memory (``.cpu()``, ``.to("cpu")``, ``cpu_t.copy_(dev_t)``)."""
    if func is aten._to_copy.default:
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False
