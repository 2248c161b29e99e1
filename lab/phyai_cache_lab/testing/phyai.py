"""phyai's own code on a CPU: the source snapshot, CPU stand-ins for its two GPU kernels, tiny models.

phyai is not on the package index; its public source is read from a snapshot (``../shared/phyai-src``
beside the repository, or the directory ``PHYAI_SRC`` names). Everything here runs phyai's real
model, runner and scheduler code; only two GPU-only kernels are replaced, as the snapshot's
``SNAPSHOT.md`` prescribes:

* RMSNorm (``phyai_kernel``, Triton-only): fp32 reduction, cast back, and the in-place fused-add
  variant (the contract of ``phyai-kernel/phyai_kernel/triton/rms_norm.py``);
* the gated activations (``flashinfer.activation.silu_and_mul`` and its gelu siblings):
  ``act(x[..., :d]) * x[..., d:]``.

The stand-ins are in-memory modules, ``phyai_kernel`` (its norms) and ``flashinfer.activation`` only,
so phyai's other flashinfer probes (attention, rope, GEMM) still fail to import and fall back to
torch/sdpa. Nothing of phyai is copied here.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ENV_VAR = "PHYAI_SRC"
MESH = ("dp", "cfg", "ep", "sp", "cp", "tp")


def phyai_source() -> Path | None:
    """The phyai snapshot's root (holding ``phyai/src/phyai``), or None where there is none."""
    candidates = [os.environ.get(ENV_VAR)] if os.environ.get(ENV_VAR) else []
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "phyai-src", Path.cwd().parent / "shared" / "phyai-src"]
    for candidate in candidates:
        root = Path(candidate)
        if (root / "phyai" / "src" / "phyai" / "__init__.py").is_file():
            return root
    return None


def missing_reason() -> str:
    return (f"phyai's source snapshot is not here: set {ENV_VAR} to a checkout of phyai (the directory "
            "holding phyai/src/phyai), or run beside ../shared/phyai-src")


# -- CPU stand-ins for the GPU-only kernels ------------------------------------------------------------

def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None) -> torch.Tensor:
    x32 = x.float()
    result = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return out.copy_(result) if out is not None else result


def _gemma_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    return _rmsnorm(x, weight.float() + 1.0, eps, out)


def _fused_add(norm: Any) -> Any:
    def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        residual.add_(x)  # in place, then the norm of the sum into x: the phyai_kernel contract
        x.copy_(norm(residual, weight, eps))
        return x, residual

    return fused_add_rmsnorm


def _layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5,
               out: torch.Tensor | None = None) -> torch.Tensor:
    result = F.layer_norm(x.float(), x.shape[-1:], weight.float(),
                          None if bias is None else bias.float(), eps).to(x.dtype)
    return out.copy_(result) if out is not None else result


def _gated(activation: Any) -> Any:
    def act_and_mul(x: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        d = x.shape[-1] // 2
        return activation(x[..., :d]) * x[..., d:]

    return act_and_mul


def _module(name: str, is_package: bool = False, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
    if is_package:
        module.__path__ = []
    module.__dict__.update(attributes)
    return module


def install_kernel_standins() -> None:
    """Put the ``phyai_kernel`` norms and ``flashinfer.activation`` CPU stand-ins in ``sys.modules``
    (idempotent); real packages, where installed, are left alone."""
    if "phyai_kernel" not in sys.modules:
        sys.modules["phyai_kernel"] = _module(
            "phyai_kernel", rmsnorm=_rmsnorm, fused_add_rmsnorm=_fused_add(_rmsnorm), gemma_rmsnorm=_gemma_rmsnorm,
            gemma_fused_add_rmsnorm=_fused_add(_gemma_rmsnorm), layernorm=_layernorm)
    if "flashinfer" not in sys.modules:
        activation = _module("flashinfer.activation", silu_and_mul=_gated(F.silu), gelu_and_mul=_gated(F.gelu),
                             gelu_tanh_and_mul=_gated(lambda x: F.gelu(x, approximate="tanh")))
        sys.modules["flashinfer.activation"] = activation
        sys.modules["flashinfer"] = _module("flashinfer", is_package=True, activation=activation)


def load_phyai(root: Path | None = None) -> Path:
    """Make ``import phyai`` work in this process: the snapshot on ``sys.path``, the stand-ins in place,
    phyai's parallel state initialised for one process and its linear layers set up without flashinfer."""
    root = root or phyai_source()
    if root is None:
        raise RuntimeError(missing_reason())
    install_kernel_standins()
    source = str(root / "phyai" / "src")
    if source not in sys.path:
        sys.path.insert(0, source)
    return root


def init_single_process() -> None:
    """phyai's parallel state for a world of one (no torch.distributed) and its linear layers."""
    import phyai.layers.linear as linear
    import phyai.parallel as parallel
    from phyai.parallel.state import _meshes

    if "model" not in _meshes:
        parallel.init(layout=(1,) * len(MESH), mesh_dim_names=MESH)
    linear.init(register_flashinfer=False)


def seeded_init(module: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """phyai allocates weights uninitialised (it expects a checkpoint): fill every parameter with a
    seeded normal draw (norm weights, which are ones, stay ones)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


@dataclass(frozen=True)
class TinyCosmos3:
    """A tiny phyai Cosmos3 transformer with the request shape that fits it."""

    transformer: torch.nn.Module
    video_shape: tuple[int, int, int]
    text_len: int
    action_chunk: int


def tiny_cosmos3_config(action: bool = False, layers: int = 4, hidden: int = 64) -> Any:
    from phyai.models.cosmos3.configuration_cosmos3 import Cosmos3Config

    heads = hidden // 16
    return Cosmos3Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        head_dim=16, intermediate_size=2 * hidden, vocab_size=256, mrope_section=(4, 2, 2),
        max_position_embeddings=32768, latent_channel=4, latent_patch_size=2, patch_latent_dim=16,
        action_gen=action, action_dim=8, num_embodiment_domains=2,
    )


def build_tiny_cosmos3(action: bool = False, layers: int = 4, seed: int = 0, scale: float = 0.1, hidden: int = 64,
                       video_shape: tuple[int, int, int] = (2, 4, 4)) -> TinyCosmos3:
    """phyai's real ``Cosmos3Transformer`` at hidden size 64 (random, seeded weights, CPU, float32).

    ``scale`` is the weights' standard deviation: large enough that the blocks, not only the
    input/output projections, shape the velocity."""
    load_phyai()
    init_single_process()
    from phyai.models.cosmos3.modeling_cosmos3 import Cosmos3Transformer

    torch.manual_seed(seed)
    transformer = Cosmos3Transformer(tiny_cosmos3_config(action, layers, hidden), params_dtype=torch.float32,
                                     device="cpu")
    seeded_init(transformer, seed, scale).eval()
    return TinyCosmos3(transformer, video_shape=video_shape, text_len=6, action_chunk=4)


def cosmos3_request(tiny: TinyCosmos3, steps: int = 12, seed: int = 0, guidance_scale: float = 6.0,
                    **fields: Any) -> Any:
    """phyai's own ``Cosmos3T2VRequest`` for ``tiny`` (pre-tokenized random prompt ids)."""
    from phyai.models.cosmos3.scheduler_ws1_cosmos3 import Cosmos3T2VRequest

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, tiny.text_len), generator=generator)
    neg = torch.randint(0, 256, (1, tiny.text_len), generator=generator)
    mask = torch.ones(1, tiny.text_len, dtype=torch.long)
    return Cosmos3T2VRequest(text_ids=ids, text_mask=mask, neg_text_ids=neg, neg_text_mask=mask.clone(),
                             video_shape=tiny.video_shape, num_inference_steps=steps,
                             guidance_scale=guidance_scale, seed=seed, **fields)


def cosmos3_scheduler(tiny: TinyCosmos3) -> Any:
    """phyai's unmodified one-process ``Cosmos3T2VScheduler`` over ``tiny`` (set up, no VAE)."""
    from phyai.models.cosmos3.scheduler_ws1_cosmos3 import Cosmos3T2VScheduler

    scheduler = Cosmos3T2VScheduler(tiny.transformer, device="cpu")
    scheduler.setup()
    return scheduler


def cosmos3_policy_scheduler(tiny: TinyCosmos3) -> Any:
    """phyai's unmodified ``Cosmos3PolicyScheduler`` (video + action) over a tiny policy model."""
    from phyai.models.cosmos3.scheduler_ws1_cosmos3_policy import Cosmos3PolicyScheduler

    scheduler = Cosmos3PolicyScheduler(tiny.transformer, device="cpu")
    scheduler.setup()
    return scheduler


def cosmos3_action_request(tiny: TinyCosmos3, steps: int = 12, seed: int = 0, guidance_scale: float = 3.0,
                           mode: str = "policy", **fields: Any) -> Any:
    """phyai's own ``Cosmos3ActionRequest``: the observation frame as random clean latents."""
    from phyai.models.cosmos3.scheduler_ws1_cosmos3_policy import Cosmos3ActionRequest

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, tiny.text_len), generator=generator)
    neg = torch.randint(0, 256, (1, tiny.text_len), generator=generator)
    mask = torch.ones(1, tiny.text_len, dtype=torch.long)
    channels = tiny.transformer.latent_channel_size
    observation = torch.randn(1, channels, *tiny.video_shape, generator=generator)
    action_dim = tiny.transformer.action_dim
    return Cosmos3ActionRequest(
        text_ids=ids, text_mask=mask, neg_text_ids=neg, neg_text_mask=mask.clone(), video_shape=tiny.video_shape,
        mode=mode, domain_id=0, action_chunk=tiny.action_chunk, raw_action_dim=action_dim, action_dim=action_dim,
        cond_video_latents=observation, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
        **fields)


# -- several processes: phyai's mesh over gloo and its world-size-N scheduler -------------------------


def init_gloo_mesh(**sizes: int) -> Any:
    """phyai's parallel state over an initialised gloo ``torch.distributed`` (every rank calls it):
    the six named axes, sizes by name (default 1, e.g. ``cfg=2``), and its linear layers. Returns
    phyai's ``Mesh``."""
    load_phyai()
    import phyai.layers.linear as linear
    import phyai.parallel as parallel

    unknown = set(sizes) - set(MESH)
    if unknown:
        raise ValueError(f"unknown phyai mesh axes {sorted(unknown)}; phyai's axes are {list(MESH)}")
    mesh = parallel.init(layout=tuple(sizes.get(axis, 1) for axis in MESH), mesh_dim_names=MESH, backend="gloo")
    linear.init(register_flashinfer=False)
    return mesh


def cosmos3_wn_scheduler(tiny: TinyCosmos3) -> Any:
    """phyai's unmodified multi-process ``Cosmos3T2VWNScheduler`` over ``tiny`` (set up, no VAE); with
    ``cfg=2`` on the mesh, cfg rank 0 runs the cond branch and cfg rank 1 the uncond one."""
    from phyai.models.cosmos3.scheduler_wn_cosmos3 import Cosmos3T2VWNScheduler

    scheduler = Cosmos3T2VWNScheduler(tiny.transformer, device="cpu")
    scheduler.setup()
    return scheduler
