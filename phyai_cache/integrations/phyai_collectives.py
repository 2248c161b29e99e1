"""phyai's own collectives for the cache: its decision exchange over named axes of phyai's mesh.

phyai spreads one model over a named mesh (``dp, cfg, ep, sp, cp, tp``) and runs every collective
through ``phyai.parallel``, which picks a backend per op (pynccl, NCCL, gloo) and knows the rules of
CUDA-graph capture. Inside phyai the cache's two collectives go the same way:

* :class:`PhyaiCommunicator`: a :class:`~phyai_cache.distributed.Communicator` over one or more axes
  of a phyai mesh, issuing ``phyai.parallel.all_reduce`` (one per axis of size > 1);
* :func:`cache_groups`: the ``process_group`` / ``cfg_group`` arguments of
  :func:`~phyai_cache.enable_dit_cache` for a model on phyai's mesh, from axis names::

      handle = enable_dit_cache(transformer, config, blocks="gen_layers", **cache_groups())

  The model axes (``sp``, ``cp``, ``tp`` by default) shard one transformer call: the decision
  statistic is summed over them. The ``cfg`` axis holds the CFG branches of one generation
  (``cfg`` rank 0 runs cond, as phyai's ``wn`` schedulers do): with ``separate_cfg=False`` its
  first member decides for the others. Axes of size 1 exchange nothing; ``dp`` replicas run
  different generations and are never reduced together.

``phyai`` is imported only when a communicator is built; docs/distributed.md has what is tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..distributed import Communicator, device_of_kind, group_timeout
from ..errors import DiTCacheConfigError

MODEL_AXES = ("sp", "cp", "tp")  # phyai's axes that shard one transformer call of one branch
CFG_AXIS = "cfg"  # phyai's axis that holds the CFG branches (cfg rank 0: cond)
REPLICA_AXES = ("dp",)  # different generations: reducing over them would mix requests


class PhyaiCommunicator(Communicator):
    """The cache's collectives over ``axes`` of a phyai mesh, through ``phyai.parallel``.

    The group is the ranks that share this rank's coordinates on every other axis; its first member
    has local rank 0 on all of ``axes``. ``all_reduce_sum`` is one ``phyai.parallel.all_reduce``
    per axis (a sum over a product of axes is the sum over each in turn). ``broadcast_first`` is the
    same sum with every member but the first contributing zeros: exact for the few small integers
    the cache sends, and the same on every backend, whereas ``phyai.parallel.broadcast``'s ``src``
    is the global rank on its gloo and NCCL backends but the axis rank on pynccl (snapshot d27fe18).
    """

    def __init__(self, axes: Sequence[str], mesh: Any = "model") -> None:
        from phyai.parallel.state import resolve_mesh

        self.mesh = resolve_mesh(mesh)
        self.axes = tuple(axes)
        torch_mesh = self.mesh.torch_mesh
        names = tuple(torch_mesh.mesh_dim_names)
        coordinate = torch_mesh.get_coordinate()
        members = torch_mesh.mesh[tuple(slice(None) if name in self.axes else index
                                        for name, index in zip(names, coordinate))]
        self.ranks = tuple(int(rank) for rank in members.flatten().tolist())
        self.rank = int(torch_mesh.mesh[tuple(coordinate)])
        self.first = all(self.mesh.axis_local_rank(axis) == 0 for axis in self.axes)
        self.name = f"phyai.parallel mesh {self.mesh.name!r} axes {list(self.axes)}"
        self.device = device_of_kind(torch_mesh.device_type)
        timeouts = [group_timeout(self.mesh.axis_group(axis)) for axis in self.axes]
        self.timeout = None if None in timeouts else max(timeouts)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        import phyai.parallel as parallel

        for axis in self.axes:
            tensor = parallel.all_reduce(tensor, axis=axis, mesh=self.mesh)
        return tensor

    def broadcast_first(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor if self.first else torch.zeros_like(tensor))


def cache_groups(*, model_axes: Sequence[str] = MODEL_AXES, cfg_axis: str | None = CFG_AXIS,
                 mesh: Any = "model") -> dict[str, PhyaiCommunicator | None]:
    """``process_group`` and ``cfg_group`` for :func:`~phyai_cache.enable_dit_cache` on phyai's mesh.

    ``model_axes``: the axes that shard one transformer call (the statistic's sum runs over those
    of size > 1). ``cfg_axis``: the axis holding the CFG branches, or None. ``mesh``: a phyai
    ``Mesh`` or registered name (``"model"``: the mesh ``phyai.parallel.init`` built). A group is
    None where all its axes have size 1. Call after ``phyai.parallel.init`` on every rank.
    """
    phyai_mesh = _resolve(mesh)
    names = tuple(phyai_mesh.torch_mesh.mesh_dim_names or ())
    model_axes = _check_axes("model_axes", model_axes, names)
    cfg_axes = _check_axes("cfg_axis", () if cfg_axis is None else (cfg_axis,), names)
    if set(cfg_axes) & set(model_axes):
        raise DiTCacheConfigError("cfg_axis", cfg_axis, f"an axis other than the model axes {list(model_axes)}",
                                  hint="the CFG axis pairs branches of one generation; the model axes shard one call")

    def over(axes: tuple[str, ...]) -> PhyaiCommunicator | None:
        wide = tuple(axis for axis in axes if phyai_mesh.axis_size(axis) > 1)
        return PhyaiCommunicator(wide, phyai_mesh) if wide else None

    return {"process_group": over(model_axes), "cfg_group": over(cfg_axes)}


def _resolve(mesh: Any) -> Any:
    from phyai.parallel.state import resolve_mesh

    try:
        return resolve_mesh(mesh)
    except KeyError as error:
        raise DiTCacheConfigError("mesh", mesh, "a phyai.parallel mesh or the name of a registered one",
                                  hint=f"call phyai.parallel.init(...) on every rank first ({error.args[0]})") from None


def _check_axes(field: str, axes: Sequence[str], names: tuple[str, ...]) -> tuple[str, ...]:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    for axis in axes:
        if axis not in names:
            raise DiTCacheConfigError(field, axis, f"axes of the mesh: {list(names)}")
        if axis in REPLICA_AXES:
            raise DiTCacheConfigError(field, axis, f"axes other than {list(REPLICA_AXES)}",
                                      hint="data-parallel replicas run different generations; their statistics must "
                                           "never be summed or shared")
    if len(set(axes)) != len(axes):
        raise DiTCacheConfigError(field, list(axes), "each axis once")
    return axes


__all__ = ["CFG_AXIS", "MODEL_AXES", "PhyaiCommunicator", "cache_groups"]
