"""Reading a transformer call's arguments the way the transformer reads them: by position or keyword.

diffusers pipelines pass every argument by keyword (``transformer(hidden_states=..., timestep=...)``);
phyai's schedulers and most custom loops pass them by position (``transformer(hidden_states, timestep,
condition, ...)``). Whatever the library reads from a call — its latents, its timestep, its encoder
stream, a named argument such as Qwen-Image's ``img_shapes`` — is read here, through the transformer
class's own forward signature, so the two ways of calling are the same call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .blocks import forward_parameters

# The argument that carries a call's noise level, first match wins: ``timestep`` in most transformers
# (diffusers, phyai's Cosmos3 and Qwen-Image), ``timesteps`` in some, one per modality and no
# ``timestep`` in diffusers' Cosmos 3 (its vision tokens are what the caches follow), ``t`` / ``sigma``
# in small custom models.
TIMESTEP_ARGUMENTS = ("timestep", "timesteps", "vision_timesteps", "t", "sigma", "sigmas")
LATENT_ARGUMENT = "hidden_states"
ENCODER_ARGUMENT = "encoder_hidden_states"

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class CallSignature:
    """Where each argument of one transformer class's forward arrives.

    ``positions`` maps every named parameter to its position (None: keyword-only). ``latent`` is the
    parameter holding the latents: ``hidden_states``, else the first positional parameter. A forward
    Python cannot read (``*args, **kwargs`` wrappers) falls back to diffusers' convention: the
    ``hidden_states`` keyword or the first positional argument, and keywords for everything else.
    """

    positions: dict[str, int | None]
    latent: str | None
    timestep: str | None

    @classmethod
    def of(cls, module: torch.nn.Module | None) -> CallSignature:
        key = type(module)
        if key not in _SIGNATURES:
            _SIGNATURES[key] = cls._read(module)
        return _SIGNATURES[key]

    @classmethod
    def _read(cls, module: torch.nn.Module | None) -> CallSignature:
        parameters = forward_parameters(module) if module is not None else []
        positional = [p.name for p in parameters if p.kind in _POSITIONAL]
        positions = {p.name: (positional.index(p.name) if p.name in positional else None)
                     for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if LATENT_ARGUMENT in positions or not positional:
            latent = LATENT_ARGUMENT
        else:
            latent = positional[0]
        timestep = next((name for name in TIMESTEP_ARGUMENTS if name in positions), None)
        return cls(positions, latent, timestep)

    def knows(self, name: str) -> bool:
        return name in self.positions

    def read(self, args: tuple | None, kwargs: dict[str, Any] | None, name: str | None) -> Any:
        """The value of argument ``name`` in this call (by keyword or position), or None."""
        if name is None:
            return None
        kwargs = kwargs or {}
        if name in kwargs:
            return kwargs[name]
        position = self.positions.get(name, 0 if name == self.latent else None)
        if position is not None and args and position < len(args):
            return args[position]
        return None

    def hidden_states(self, args: tuple | None, kwargs: dict[str, Any] | None) -> Any:
        return self.read(args, kwargs, self.latent)

    def encoder_hidden_states(self, args: tuple | None, kwargs: dict[str, Any] | None) -> Any:
        return self.read(args, kwargs, ENCODER_ARGUMENT)

    def timestep_value(self, args: tuple | None, kwargs: dict[str, Any] | None) -> Any:
        """The call's timestep argument (any of :data:`TIMESTEP_ARGUMENTS`), or None where it has none.

        A forward whose signature cannot be read is searched for the names as keywords."""
        kwargs = kwargs or {}
        if self.timestep is not None:
            return self.read(args, kwargs, self.timestep)
        return next((kwargs[name] for name in TIMESTEP_ARGUMENTS if name in kwargs), None)

    def describe_timestep(self) -> str:
        return (f"its {self.timestep!r} argument" if self.timestep is not None
                else f"an argument named one of {', '.join(TIMESTEP_ARGUMENTS)}")


_SIGNATURES: dict[type, CallSignature] = {}
