"""Multi-device runs: every rank that holds a piece of one model call takes the same decision.

A DiT run across devices shards one transformer call over a *model group* of processes (sequence or
context parallel: each rank holds some tokens; tensor parallel: each rank holds some heads and sees
replicated hidden states) and may put the CFG branches on different ranks (a *CFG group*: cond on
one rank, uncond on another). A cache that decides per rank from its local tensors breaks the first
case: with tokens sharded each rank measures a different relative L1, ranks disagree, and a rank that
skips the middle blocks also skips their collectives while its peers wait in them (a hang).

What this module adds, and where it plugs in (the decision sequence itself stays
:func:`phyai_cache.decision.decide`):

* :class:`ParallelLayout`, built once at enable time from the caller's groups
  (``enable_dit_cache(..., process_group=, cfg_group=)``) or from what a diffusers transformer
  says about itself (``enable_parallelism``: its ``_parallel_config``), and kept on the
  :class:`~phyai_cache.runtime.CacheTarget`. Data-parallel replicas are separate groups and are
  never reduced together: the world group is never assumed.
* :class:`Communicator`: the two collectives the cache issues over one group (a sum of one tensor,
  the first member's tensor to all). A ``torch.distributed`` group is wrapped in
  :class:`TorchCommunicator` (the default); any other implementation is passed where a group is
  accepted (phyai's own collectives: :mod:`phyai_cache.integrations.phyai_collectives`).
* the measure's reduction (:meth:`ParallelLayout.reducer`): each rank sums ``|r_t - r_last|`` and
  ``|r_last|`` over its shard and ONE all-reduce per decision point adds them up (all row groups of
  a step-level batch packed in the same tensor), so every rank computes the whole tensor's
  statistic, equal to what one process computes on the whole tensor up to float summation order.
* CFG across ranks (:class:`ParallelSharedDecisions`): with ``separate_cfg=False`` the *leader* —
  the rank whose rank in ``cfg_group`` is 0, which must hold the first branch (cond) — decides
  and broadcasts the decision to the other members, which follow it; with separate CFG nothing is
  exchanged across the CFG group.
* failure: every cache collective runs under the group's own timeout (set with
  ``init_process_group(timeout=...)`` / ``new_group(timeout=...)``). A peer that raised, or runs
  another step, makes the collective fail or time out; the error surfaces as
  :class:`~phyai_cache.errors.DistributedCacheError` naming this rank, the group, the step and what
  to do, and every later cache collective on that layout refuses at once instead of waiting again.
  Every packed tensor also carries each decision's run number and step, so ranks that meet in the
  collective at different steps are reported instead of mixing their statistics.

Backends other than the native engine do not reduce (diffusers' hooks) or reduce over the default
world group (Cache-DiT); :func:`refuse_sharded` and :func:`check_cache_dit` keep them off the layouts
where that would silently diverge. docs/distributed.md has the support table and measured costs.
"""

from __future__ import annotations

import abc
import datetime
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from .decision import SharedDecisions
from .errors import BackendUnavailableError, CacheStateError, DistributedCacheError, DiTCacheConfigError

logger = logging.getLogger("phyai_cache")

CFG_LEADER = "cfg_leader"  # the branch name a follower reports: its reason is "follows_cfg_leader"


def _dist() -> Any:
    import torch.distributed as dist

    return dist


class Communicator(abc.ABC):
    """The collectives the cache issues over one group of ranks; accepted wherever a group is.

    What the cache needs, and all an implementation provides: ``all_reduce_sum`` (the elementwise
    sum of one small tensor over the members) and ``broadcast_first`` (the tensor of the first
    member, ``ranks[0]``, on every member), plus who is in the group. A collective that fails or
    times out just raises (any exception): :class:`ParallelLayout` turns it into a
    :class:`~phyai_cache.errors.DistributedCacheError` naming the rank, the group (``name``,
    ``ranks``, ``timeout``) and the step, and refuses every later collective on that layout at once.

    ``name``: what error messages call the group. ``rank``: this process's global rank. ``ranks``:
    the members' global ranks in group order (``ranks[0]`` leads CFG). ``device``: where the
    tensors handed to the collectives must live. ``timeout``: how long a collective waits, where known.
    """

    name: str
    rank: int
    ranks: tuple[int, ...]
    device: torch.device = torch.device("cpu")
    timeout: datetime.timedelta | None = None

    @abc.abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over the members (may be ``tensor`` itself, summed in place)."""

    @abc.abstractmethod
    def broadcast_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """``ranks[0]``'s ``tensor`` on every member (may be ``tensor`` itself, overwritten in place)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, ranks {list(self.ranks)})"


class TorchCommunicator(Communicator):
    """A ``torch.distributed`` process group: what ``process_group=`` / ``cfg_group=`` wrap by default."""

    def __init__(self, group: Any) -> None:
        dist = _dist()
        self.group = group
        self.name = "a torch.distributed group"
        self.rank = dist.get_rank()
        self.ranks = tuple(dist.get_process_group_ranks(group))
        self.device = _collective_device(group)
        self.timeout = group_timeout(group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        _dist().all_reduce(tensor, group=self.group)
        return tensor

    def broadcast_first(self, tensor: torch.Tensor) -> torch.Tensor:
        _dist().broadcast(tensor, src=self.ranks[0], group=self.group)
        return tensor


@dataclass
class ParallelLayout:
    """The groups one cached model is spread over, for the whole life of the cache.

    ``group``: the ranks that each hold a shard (or a replica) of one transformer call; the decision
    statistic is reduced over it. ``cfg_group``: the ranks that hold the CFG branches of one
    generation; with ``separate_cfg=False`` its first member decides for the others. Either is None
    when it has a single member (nothing to exchange); each is a :class:`Communicator`.
    """

    group: Communicator | None
    cfg_group: Communicator | None
    source: str
    rank: int
    collectives: int = 0  # cache collectives issued so far (tests and benchmarks read it)
    failed: str | None = None  # why an earlier cache collective failed; later ones refuse at once
    _runs: Any = field(default_factory=itertools.count, repr=False)

    @property
    def group_ranks(self) -> tuple[int, ...]:
        return self.group.ranks if self.group is not None else (self.rank,)

    @property
    def cfg_ranks(self) -> tuple[int, ...]:
        return self.cfg_group.ranks if self.cfg_group is not None else ()

    @property
    def cfg_leader(self) -> bool:
        return self.cfg_group is None or self.cfg_ranks[0] == self.rank

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "rank": self.rank, "group_ranks": list(self.group_ranks),
                "cfg_ranks": list(self.cfg_ranks), "cfg_leader": self.cfg_ranks[0] if self.cfg_ranks else None,
                "communicators": [group.name for group in (self.group, self.cfg_group) if group is not None]}

    # -- what the engine asks for -----------------------------------------------------------

    def shared_decisions(self, enabled: bool) -> ParallelSharedDecisions:
        """The shared CFG decisions of a new run (numbered: the number travels with its collectives)."""
        return ParallelSharedDecisions(enabled=enabled, layout=self, run=next(self._runs))

    def reducer(self, points: Sequence[tuple[SharedDecisions, Any]]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The sum over ``group`` of the sums measured at one decision point, or None (one process).

        ``points`` are the (run's shared decisions, call) of the row groups whose sums are packed,
        in order; their run numbers and steps travel in the same tensor so that ranks which meet at
        different decisions are reported, not mixed.
        """
        if self.group is None:
            return None
        tags = [(float(getattr(shared, "run", 0)), float(call.step)) for shared, call in points]
        where = ", ".join(f"step {call.step} of branch {call.branch!r}" for _, call in points)
        return lambda sums: self._all_reduce(sums, tags, where)

    # -- collectives ----------------------------------------------------------------------------

    def _all_reduce(self, sums: torch.Tensor, tags: list[tuple[float, float]], where: str) -> torch.Tensor:
        group = self.group
        tag = torch.tensor(tags, dtype=torch.float64).flatten()
        payload = torch.cat([sums.to(torch.float64), tag.to(sums.device), (tag * tag).to(sums.device)])
        reduced = self._run(group, lambda: group.all_reduce_sum(payload), "decision all-reduce", where)
        host = reduced.cpu()  # the step's one host sync (the single-process statistic has one too)
        count, size = sums.numel(), len(group.ranks)
        total, square = host[count:count + tag.numel()], host[count + tag.numel():]
        # Every rank sent the same tags exactly when their sum is n*t and their sum of squares n*t^2
        # (zero variance); small integers are exact in float64.
        if not (torch.equal(total, tag * size) and torch.equal(square, tag * tag * size)):
            self._fail(f"ranks {list(group.ranks)} met in the cache's decision all-reduce at different "
                       f"decision points (this rank: run {tags[0][0]:.0f}, {where}); they must run the same "
                       "steps, branches and cache config in the same order")
        return host[:count]

    def broadcast_decision(self, run: int, step: int, branch: str, cached: bool | None) -> bool:
        """CFG leader: send ``cached``; follower: receive the leader's decision for (run, step)."""
        group = self.cfg_group
        payload = torch.tensor([float(bool(cached)), float(run), float(step)], dtype=torch.float64,
                               device=group.device)
        where = f"step {step} of branch {branch!r}"
        received = self._run(group, lambda: group.broadcast_first(payload), "CFG decision broadcast", where)
        flag, leader_run, leader_step = received.tolist()
        if (leader_run, leader_step) != (run, step):
            self._fail(f"the CFG leader (rank {group.ranks[0]}) decided run {leader_run:.0f} step "
                       f"{leader_step:.0f} while this rank is at run {run} step {step} of branch {branch!r}; "
                       "every CFG rank must call the transformer once per step, in the same runs")
        return bool(flag)

    def _run(self, group: Communicator, collective: Callable[[], torch.Tensor], what: str, where: str
             ) -> torch.Tensor:
        if self.failed is not None:
            raise DistributedCacheError(
                f"rank {self.rank}: an earlier cache collective on this layout failed ({self.failed}), so the process "
                "group can no longer be trusted: destroy it, create a new one on every rank and enable the cache "
                "again with it")
        self.collectives += 1
        try:
            return collective()
        except Exception as error:  # gloo raises RuntimeError, NCCL DistBackendError, phyai PhyaiDistError: all one
            timeout = f" (group timeout {group.timeout.total_seconds():g} s)" if group.timeout is not None else ""
            self._fail(f"the cache's {what} over ranks {list(group.ranks)} ({group.name}) at {where} failed on rank "
                       f"{self.rank}{timeout}: {type(error).__name__}: {error}",
                       advice="A peer did not reach the same decision point: it raised, stopped, or runs another "
                              "step, branch or cache config. Look for the first error on the other ranks; then destroy "
                              "the process group (torch.distributed.destroy_process_group), restart the ranks and "
                              "enable the cache again", cause=error)

    def _fail(self, what: str, advice: str = "", cause: BaseException | None = None) -> NoReturn:
        self.failed = what  # later collectives on this layout refuse at once, naming it
        raise DistributedCacheError(f"{what}. {advice}" if advice else what) from cause


class ParallelSharedDecisions(SharedDecisions):
    """:class:`~phyai_cache.decision.SharedDecisions` of one run whose CFG branches may be on other ranks.

    Without a CFG group (or with separate CFG) it is the in-process sharing of its base class. With
    a CFG group and ``separate_cfg=False``: on the leader rank, recording a decision also broadcasts
    it to the CFG group; on a follower rank, asking for the leader's decision receives it. The
    decision sequence (:func:`~phyai_cache.decision.decide`) asks every call of a step for the
    leader's decision exactly once and records every leader decision exactly once, so both sides
    issue one broadcast per step, in the same order, whatever the step rules decide.
    """

    def __init__(self, enabled: bool, layout: ParallelLayout, run: int) -> None:
        super().__init__(enabled=enabled)
        self.layout = layout
        self.run = run
        self._across_ranks = enabled and layout.cfg_group is not None

    def leader(self, step: int, branch: str) -> tuple[str, bool] | None:
        if self._across_ranks and not self.layout.cfg_leader and step not in self.by_step:
            self.by_step[step] = (CFG_LEADER, self.layout.broadcast_decision(self.run, step, branch, None))
        return super().leader(step, branch)

    def record(self, step: int, branch: str, cached: bool) -> None:
        if self._across_ranks and self.layout.cfg_leader and step not in self.by_step:
            self.layout.broadcast_decision(self.run, step, branch, cached)
        super().record(step, branch, cached)


# -- building the layout at enable time ------------------------------------------------------------


def resolve_parallel(transformer: torch.nn.Module, process_group: Any = None, cfg_group: Any = None
                     ) -> ParallelLayout | None:
    """The layout of a cached model from the caller's groups and what the model says; None for one process.

    Each group is a ``torch.distributed`` group, a 1-D ``DeviceMesh`` or a :class:`Communicator`.
    Raises a clear error (nothing is changed yet) for a group this process is not part of, a group
    passed without an initialised ``torch.distributed``, a multi-dimensional mesh, a CFG group
    overlapping the model group, or a group that misses ranks the model is sharded over.
    """
    explicit = _as_communicator(process_group, "process_group")
    cfg = _as_communicator(cfg_group, "cfg_group")
    detected = detect_model_group(transformer)
    if explicit is None and cfg is None and detected is None:
        _note_unsharded_world()
        return None
    group, source = explicit, "process_group argument"
    if detected is not None:
        detected_group, detected_source = TorchCommunicator(detected[0]), detected[1]
        if explicit is None:
            group, source = detected_group, detected_source
        elif not set(detected_group.ranks) <= set(explicit.ranks):
            raise DiTCacheConfigError(
                "process_group", f"ranks {list(explicit.ranks)}",
                f"a group containing ranks {list(detected_group.ranks)}",
                hint=f"{type(transformer).__name__} is sharded by {detected_source} over those ranks; the "
                     "statistic must be reduced over every shard (omit process_group to use the model's own group)")
    rank = (group or cfg).rank
    group_ranks = group.ranks if group is not None else (rank,)
    cfg_ranks = cfg.ranks if cfg is not None else ()
    if len(group_ranks) == 1 and len(cfg_ranks) <= 1:
        return None  # single-member groups: nothing to exchange, one process's behaviour exactly
    if cfg_ranks and set(cfg_ranks) & set(group_ranks) != {rank}:
        raise DiTCacheConfigError(
            "cfg_group", f"ranks {list(cfg_ranks)}", f"ranks holding other CFG branches, none of {list(group_ranks)} "
            "but this one", hint="the CFG group pairs this rank with the ranks that run the other branches of the same "
                                 "generation; the model group holds the shards of this rank's own branch")
    return ParallelLayout(
        group=group if len(group_ranks) > 1 else None, cfg_group=cfg if len(cfg_ranks) > 1 else None,
        source=source if group is not None else "cfg_group argument", rank=rank)


def detect_model_group(transformer: torch.nn.Module) -> tuple[Any, str] | None:
    """The group a diffusers transformer is sharded over, from ``enable_parallelism``'s record.

    diffusers (0.36+) keeps the applied :class:`ParallelConfig` in ``transformer._parallel_config``.
    Context parallelism splits the sequence over the flattened ``ring x ulysses`` mesh
    (``_flattened_mesh``, what its split hooks shard with); tensor parallelism keeps the hidden states
    replicated over its ``tp`` mesh (reducing over it is then exact and keeps ranks agreeing).
    """
    config = getattr(transformer, "_parallel_config", None)
    if config is None:
        return None
    cp = getattr(config, "context_parallel_config", None)
    if cp is not None:
        mesh = getattr(cp, "_flattened_mesh", None)
        if mesh is None:
            raise CacheStateError(f"{type(transformer).__name__} has a context-parallel config that was never set "
                                  "up (no mesh); call transformer.enable_parallelism(config=...) before enabling the "
                                  "cache")
        return mesh.get_group(), (f"diffusers context parallelism (ulysses_degree={cp.ulysses_degree}, "
                                  f"ring_degree={cp.ring_degree})")
    tp = getattr(config, "tensor_parallel_config", None)
    if tp is not None and getattr(tp, "_mesh", None) is not None:
        return tp._mesh.get_group(), f"diffusers tensor parallelism (tp_degree={tp._mesh.size()})"
    return None


def check_blocks_see_their_shard(lists: Sequence[Any]) -> None:
    """Refuse models whose context-parallel plan splits the sequence *at* a cached block.

    diffusers shards the sequence with a hook that replaces a module's ``forward``. Where that module
    is the transformer itself (Flux, Flux2, LTX) every block sees its rank's shard. Where it is a
    block (Wan, QwenImage, ChronoEdit, MiniMax-H3 in diffusers 0.42: ``"blocks.0"``), the split runs
    inside the block's forward, below the cache's own block wrapper, which would then compare the
    whole sequence with a shard.
    """
    for block_list in lists:
        for index, (block, io) in enumerate(zip(block_list.blocks, block_list.io)):
            registry = getattr(block, "_diffusers_hook", None)
            hooks = getattr(registry, "hooks", {}) or {}
            for name, hook in hooks.items():
                metadata = getattr(hook, "metadata", None)
                if not name.startswith("cp_input") or not isinstance(metadata, dict):
                    continue
                split = [arg for arg, spec in metadata.items() if arg in (io.hidden_name, io.encoder_name)
                         and not getattr(spec, "split_output", False)]
                if split:
                    raise BackendUnavailableError(
                        f"{block_list.path}.{index} splits {', '.join(split)} across context-parallel ranks inside its "
                        "own forward (the model's _cp_plan); a cache wrapped around that block would compare the "
                        "whole sequence with one rank's shard. phyai_cache supports context parallelism for models "
                        "that split at the transformer's input (e.g. Flux); for this one pass a cp_plan that splits "
                        "at the transformer ('' key) to enable_parallelism, or run it without caching")


# -- backends that cannot follow a layout -----------------------------------------------------------


def refuse_sharded(layout: ParallelLayout | None, backend: str, why: str) -> None:
    """Raise, before anything is changed, when a backend that cannot reduce meets a multi-rank layout."""
    if layout is None:
        return
    raise BackendUnavailableError(
        f"backend {backend!r} cannot serve a model spread over processes ({layout.source}; model group ranks "
        f"{list(layout.group_ranks)}, CFG group ranks {list(layout.cfg_ranks) or '-'}): {why}. Ranks would take "
        "different decisions and the ones that compute would wait forever in collectives the others skip. Use "
        "backend='native' (strategies fbcache, dbcache, taylorseer), which reduces its statistic over the model "
        "group and shares CFG decisions over the CFG group")


def check_cache_dit(layout: ParallelLayout | None) -> None:
    """Cache-DiT's own multi-rank support, where it is right; refuse elsewhere.

    Cache-DiT (1.5.3, ``CachedContextManager.similarity``) all-reduces the two means of its statistic
    with ``ReduceOp.AVG`` over the *default (world) group* whenever ``torch.distributed`` has more than
    one rank. That equals the whole tensor's statistic exactly when the world is the one group the
    model is sharded over (equal shards); with data-parallel replicas, CFG ranks, or an unsharded model
    in a multi-rank job it averages statistics of different generations.
    """
    dist = _dist()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1 and layout is None:
        return
    why = None
    if layout is not None and layout.cfg_group is not None:
        why = ("Cache-DiT all-reduces its statistic over the whole world, so the CFG ranks would average the cond "
               "and uncond statistics")
    elif layout is None or layout.group is None:
        why = (f"torch.distributed has {world} ranks and this model is not sharded over them, but Cache-DiT "
               "all-reduces its statistic over the whole world at every check: data-parallel replicas would average "
               "each other's statistics (and hang when they run different step counts)")
    elif len(layout.group_ranks) != world:
        why = (f"the model is sharded over ranks {list(layout.group_ranks)} of a {world}-rank world, but Cache-DiT "
               "all-reduces its statistic over the whole world, mixing in the other groups' generations")
    if why is not None:
        raise BackendUnavailableError(
            f"backend 'cache_dit' cannot serve this multi-rank layout: {why}. Use backend='native', which reduces "
            "over the model's own group only")


# -- helpers ----------------------------------------------------------------------------------------


def _as_communicator(value: Any, name: str) -> Communicator | None:
    if value is None or isinstance(value, Communicator):
        if value is not None and value.rank not in value.ranks:
            raise DiTCacheConfigError(name, f"{value!r}", f"a group containing this rank ({value.rank})")
        return value
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise DiTCacheConfigError(name, value, "a process group of an initialised torch.distributed, or a "
                                  "phyai_cache Communicator",
                                  hint="call torch.distributed.init_process_group(...) on every rank first")
    if value is dist.GroupMember.NON_GROUP_MEMBER:
        raise DiTCacheConfigError(name, "GroupMember.NON_GROUP_MEMBER", "a group this rank belongs to",
                                  hint="torch.distributed.new_group returns this on ranks outside the group; pass the "
                                       "group of this rank's own shards")
    if type(value).__name__ == "DeviceMesh":
        if value.ndim != 1:
            raise DiTCacheConfigError(name, f"a {value.ndim}-D DeviceMesh {value.mesh_dim_names}", "a 1-D mesh or a "
                                      "process group", hint="pass mesh[dims]._flatten() or mesh.get_group(dim)")
        value = value.get_group()
    if not isinstance(value, dist.ProcessGroup):
        raise DiTCacheConfigError(name, value, "a torch.distributed ProcessGroup (or a 1-D DeviceMesh, or a "
                                  "phyai_cache Communicator)")
    if dist.get_rank(value) < 0:
        raise DiTCacheConfigError(name, f"ranks {_ranks(value)}", f"a group containing this rank ({dist.get_rank()})")
    return TorchCommunicator(value)


def _ranks(group: Any) -> list[int]:
    return list(_dist().get_process_group_ranks(group))


def _collective_device(group: Any) -> torch.device:
    """Where a small tensor for ``group`` must live (CUDA for NCCL, else CPU)."""
    try:
        from torch.distributed.distributed_c10d import _get_object_coll_device

        kind = _get_object_coll_device(group)
    except Exception:  # a private helper: fall back to CPU, which gloo and most backends accept
        kind = "cpu"
    return device_of_kind(kind)


def device_of_kind(kind: str) -> torch.device:
    """This process's device of a kind (``"cuda"``: the current CUDA device)."""
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def group_timeout(group: Any) -> datetime.timedelta | None:
    """A torch.distributed group's collective timeout, or None where its backend does not expose it."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout
    except Exception:
        return None


_noted_world = False


def _note_unsharded_world() -> None:
    """Once per process: a multi-rank job whose model says nothing about sharding decides per rank."""
    global _noted_world
    dist = _dist()
    if _noted_world or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    _noted_world = True
    logger.info("phyai_cache: torch.distributed has %d ranks and no process_group was given: each rank decides on "
                "its own tensors (right for data-parallel replicas). If this model is sharded over ranks, pass "
                "enable_dit_cache(..., process_group=<its group>) or its ranks will disagree and hang",
                dist.get_world_size())


__all__ = ["CFG_LEADER", "Communicator", "ParallelLayout", "ParallelSharedDecisions", "check_blocks_see_their_shard",
           "check_cache_dit", "detect_model_group", "device_of_kind", "group_timeout", "refuse_sharded",
           "resolve_parallel", "TorchCommunicator"]
