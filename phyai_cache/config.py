"""The one cache configuration schema shared by every backend.

:class:`DiTCacheConfig` is a frozen dataclass with flat fields, so YAML files, ``dit_cache:``
sections of larger pipeline configs and keyword overrides all map onto it directly. It validates
itself in ``__post_init__``; any problem raises :class:`DiTCacheConfigError` naming the field,
the bad value and what is allowed. Strategy-specific defaults (threshold, block counts, warmup)
are filled in at construction, so ``to_dict()`` always shows the values that will really be used.

``enabled`` is ``False`` by default: a default config changes nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import DiTCacheConfigError, did_you_mean
from .strategies import BACKENDS, STRATEGY_SPECIFIC_FIELDS, backend_names, get_strategy, strategy_names

logger = logging.getLogger(__name__)

MAX_TAYLORSEER_ORDER = 4

# Which unified fields carry a meaning for which strategy, their defaults and the values that define
# a strategy are declared once per strategy in phyai_cache/strategies/. Setting a field that a
# strategy does not use is an error, never silently ignored. ``enabled``, ``backend``, ``strategy``,
# ``separate_cfg`` and ``options`` apply to every strategy.

SeparateCFG = bool | Literal["auto"]


@dataclass(frozen=True)
class DiTCacheConfig:
    """Training-free DiT cache settings, the same for every backend.

    Fields (see docs/config-reference.md for the full table):

    enabled:
        Master switch. ``False`` (the default) means the target is never touched.
    backend:
        ``"auto"`` (best installed backend for the strategy, falling back to native),
        ``"native"``, ``"diffusers"`` or ``"cache_dit"``.
    strategy:
        A strategy declared in ``phyai_cache/strategies/`` (one module each; ``phyai-cache backends``
        lists them with the backends serving each).
    threshold:
        A step reuses the cache while the strategy's own statistic stays below it: 0 never caches,
        higher is faster and less faithful. The statistic is the strategy's (docs/config-reference.md):
        the front blocks' relative L1 residual change for fbcache/dbcache, an accumulated error or
        change over the streak for magcache, easycache, teacache and seacache.
    front_blocks, back_blocks:
        Fn blocks always computed at the front (their residual drives the decision) and Bn blocks
        always computed at the back. fbcache is Fn=1, Bn=0.
    warmup_steps:
        The first steps always compute, counted from step 0 of each run and branch.
    active_steps:
        ``(start, end)``: caching may happen only for ``start <= step < end``; ``end=None`` means
        to the last step.
    max_cached_steps, max_consecutive_cached:
        Caps per run and branch; ``None`` means unlimited.
    taylorseer_order:
        Order of the Taylor forecaster applied to cached residuals (0 = plain reuse, 1 = linear,
        ...); ``None`` turns it off.
    cache_interval:
        Static schedules (taylorseer): after warmup, compute every N-th step and forecast between.
    compute_mask:
        Per-step list of 1 (must compute) and 0 (may use the cache: by threshold for fbcache/dbcache,
        always for taylorseer); steps past its end compute. A string such as "1110110" works too.
    separate_cfg:
        ``True``: each CFG branch decides on its own; ``False``: the first branch of a step decides
        for all branches (state is still kept per branch); ``"auto"``: the backend's best choice.
    options:
        Backend-specific settings passed through after validation by the backend.
    calibrated_on:
        The transformer class (``type(model).__name__``) whose runs the config's values were tuned or
        calibrated on; a preset records it. Enabling the config on another class logs a warning once
        (:func:`warn_if_calibrated_elsewhere`) naming ``phyai-cache tune`` / ``calibrate``. ``None``:
        not recorded, no check.
    """

    enabled: bool = False
    backend: str = "auto"
    strategy: str = "fbcache"
    threshold: float | None = None
    front_blocks: int | None = None
    back_blocks: int | None = None
    warmup_steps: int | None = None
    active_steps: tuple[int, int | None] | None = None
    max_cached_steps: int | None = None
    max_consecutive_cached: int | None = None
    taylorseer_order: int | None = None
    cache_interval: int | None = None
    compute_mask: tuple[int, ...] | None = None
    separate_cfg: SeparateCFG = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)
    calibrated_on: str | None = None

    def __post_init__(self) -> None:
        self._set("enabled", _check_bool("enabled", self.enabled))
        self._set("backend", _check_choice("backend", self.backend, backend_names(), aliases=_BACKEND_ALIASES))
        self._set("strategy", _check_choice("strategy", self.strategy, strategy_names()))
        self._validate_values()
        self._check_strategy_fields()
        self._fill_strategy_defaults()

    # -- validation -----------------------------------------------------------------------------

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _validate_values(self) -> None:
        if self.threshold is not None:
            self._set("threshold", _check_number("threshold", self.threshold, minimum=0.0))
        for name, minimum in (
            ("front_blocks", 1),
            ("back_blocks", 0),
            ("warmup_steps", 0),
            ("max_cached_steps", 0),
            ("max_consecutive_cached", 0),
        ):
            value = getattr(self, name)
            if value is not None:
                self._set(name, _check_int(name, value, minimum=minimum))
        if self.taylorseer_order is not None:
            order = _check_int("taylorseer_order", self.taylorseer_order, minimum=0,
                               maximum=MAX_TAYLORSEER_ORDER, hint="use null to turn the forecaster off")
            self._set("taylorseer_order", order)
        if self.cache_interval is not None:
            self._set("cache_interval", _check_int("cache_interval", self.cache_interval, minimum=1))
        if self.compute_mask is not None:
            self._set("compute_mask", _check_compute_mask(self.compute_mask))
            if self.cache_interval is not None:
                raise DiTCacheConfigError("cache_interval", self.cache_interval, "null when compute_mask is set",
                                          hint="a compute mask already fixes which steps compute")
        if self.active_steps is not None:
            self._set("active_steps", _check_active_steps(self.active_steps))
        if not (isinstance(self.separate_cfg, bool) or self.separate_cfg == "auto"):
            raise DiTCacheConfigError("separate_cfg", self.separate_cfg, "true, false or 'auto'")
        self._set("options", _check_options(self.options))
        if self.calibrated_on is not None and (not isinstance(self.calibrated_on, str) or not self.calibrated_on):
            raise DiTCacheConfigError("calibrated_on", self.calibrated_on, "a transformer class name, or null",
                                      hint="e.g. FluxTransformer2DModel: the class the values were tuned on")

    def _check_strategy_fields(self) -> None:
        spec = get_strategy(self.strategy)
        for name in STRATEGY_SPECIFIC_FIELDS:
            value = getattr(self, name)
            if value is None or name in spec.fields:
                continue
            users = [s for s in strategy_names() if name in get_strategy(s).fields]
            raise DiTCacheConfigError(
                name, value, "null (unset) for strategy " + repr(self.strategy),
                hint=f"{name} has no meaning for {self.strategy!r}; it applies to {', '.join(users)}",
            )
        for name, fixed in spec.fixed.items():
            value = getattr(self, name)
            if value is not None and value != fixed:
                raise DiTCacheConfigError(name, value, f"{fixed} for strategy {self.strategy!r}", hint=spec.fixed_hint)

    def _fill_strategy_defaults(self) -> None:
        spec = get_strategy(self.strategy)
        used = spec.fields
        for name, default in spec.defaults.items():
            if name == "cache_interval" and self.compute_mask is not None:
                continue  # the mask is the schedule
            if getattr(self, name) is None:
                self._set(name, default)
        if "active_steps" in used and self.active_steps is None:
            self._set("active_steps", (0, None))

    # -- conversion -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> DiTCacheConfig:
        """Build a config from a flat mapping; unknown keys fail with a did-you-mean."""
        if not isinstance(mapping, Mapping):
            raise DiTCacheConfigError("<config>", mapping, "a mapping of DiTCacheConfig fields")
        known = field_names()
        for key in mapping:
            if not isinstance(key, str) or key not in known:
                shown = key if isinstance(key, str) and key.isidentifier() else repr(key)
                raise DiTCacheConfigError(
                    shown, mapping[key], "one of " + ", ".join(known),
                    hint=did_you_mean(key, known) or "unknown field",
                )
        return cls(**dict(mapping))

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-friendly dict of every field, defaults filled in."""
        data = asdict(self)
        data["active_steps"] = list(self.active_steps) if self.active_steps is not None else None
        data["compute_mask"] = list(self.compute_mask) if self.compute_mask is not None else None
        data["options"] = _plain(self.options)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> DiTCacheConfig:
        return load_config(_parse_yaml(text, "<yaml text>"))

    def replace(self, **changes: Any) -> DiTCacheConfig:
        """A copy with ``changes`` applied and everything validated again.

        Strategy defaults are re-derived when the strategy changes, so ``cfg.replace(strategy=...)``
        never carries another strategy's defaults along.
        """
        base = self.to_dict()
        if "strategy" in changes and changes["strategy"] != self.strategy:
            base = {k: v for k, v in base.items() if k in _STRATEGY_INDEPENDENT_FIELDS}
        return DiTCacheConfig.from_dict({**base, **changes})

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=repr))


_BACKEND_ALIASES = {"cache-dit": "cache_dit", "cachedit": "cache_dit"}
_STRATEGY_INDEPENDENT_FIELDS = ("enabled", "backend", "strategy", "separate_cfg", "options")


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(DiTCacheConfig))


_WARNED_CALIBRATION: set[tuple[str, str]] = set()


def warn_if_calibrated_elsewhere(config: DiTCacheConfig, model: Any) -> bool:
    """Log a warning (once per process for each pair of classes) when ``config`` was calibrated on
    another transformer class than ``model``'s; True when it was. Thresholds, schedules and
    calibrated options (TeaCache's polynomial, MagCache's ratios) do not always carry over: a
    TeaCache preset tuned on one model lost its quality tier on another."""
    found = type(model).__name__
    if not config.enabled or config.calibrated_on is None or config.calibrated_on == found:
        return False
    pair = (config.calibrated_on, found)
    if pair not in _WARNED_CALIBRATION:
        _WARNED_CALIBRATION.add(pair)
        logger.warning(
            "phyai_cache: this %s config was calibrated on %s, not %s; its quality tier may not hold here. Tune "
            "it for this model in one command: `phyai-cache tune --pipeline FILE.py:FUNCTION --strategy %s "
            "--target-psnr 40 --out my-preset.yaml` (or `phyai-cache calibrate --pipeline ...` for its calibrated "
            "options alone); see docs/benchmarks.md, \"Tune a preset for your own model\"",
            config.strategy, config.calibrated_on, found, config.strategy)
    return True


# -- loading ------------------------------------------------------------------------------------

ConfigSource = DiTCacheConfig | Mapping[str, Any] | str | Path | None

def _find_preset_dir() -> Path:
    # Installed wheels carry the presets inside the package; a source checkout keeps them in the
    # top-level configs/ folder next to the package.
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return here / "configs"


PRESET_DIR = _find_preset_dir()
SECTION_KEY = "dit_cache"


def load_config(source: ConfigSource = None, **overrides: Any) -> DiTCacheConfig:
    """Resolve any supported config source to a validated :class:`DiTCacheConfig`.

    ``source`` may be a ``DiTCacheConfig``, a mapping (the bare schema, or a larger pipeline/model
    config that carries a ``dit_cache:`` section anywhere in it; its other keys are ignored), a
    path to a YAML file of either shape, or the name of a preset shipped in ``configs/``.
    ``None`` is the default (disabled) config. ``overrides`` are applied on top (:func:`with_overrides`:
    ``options`` merge into the source's options). Presets are parsed once per process.
    """
    if source is None:
        config = DiTCacheConfig()
    elif isinstance(source, DiTCacheConfig):
        config = source
    elif isinstance(source, Mapping):
        config = _config_from_mapping(source)
    elif isinstance(source, (str, Path)):
        config = _config_from_mapping(_read_yaml_source(source))
    else:
        raise DiTCacheConfigError(
            "<config>", source, "a DiTCacheConfig, a mapping, a YAML path or a preset name"
        )
    return with_overrides(config, overrides)


def with_overrides(config: DiTCacheConfig, overrides: Mapping[str, Any]) -> DiTCacheConfig:
    """``config`` with ``overrides`` on top: fields are replaced, ``options`` merge key by key, so
    ``load_config("magcache-balanced", options={"skip_call": False})`` keeps the preset's calibrated
    ``mag_ratios`` (pass a whole config to replace every option)."""
    if not overrides:
        return config
    options = overrides.get("options")
    if isinstance(options, Mapping):
        overrides = {**overrides, "options": {**config.options, **options}}
    return config.replace(**overrides)


def _config_from_mapping(mapping: Mapping[str, Any]) -> DiTCacheConfig:
    sections = list(_find_sections(mapping, path=()))
    if len(sections) > 1:
        where = ", ".join(".".join(p) for p, _ in sections)
        raise DiTCacheConfigError(SECTION_KEY, where, "exactly one dit_cache section per config")
    if sections:
        _, section = sections[0]
        return _config_from_section(section)
    return DiTCacheConfig.from_dict(mapping)


def _config_from_section(section: Any) -> DiTCacheConfig:
    if section is None or section is False:
        return DiTCacheConfig()
    if section is True:
        return DiTCacheConfig(enabled=True)
    if isinstance(section, Mapping):
        return DiTCacheConfig.from_dict(section)
    raise DiTCacheConfigError(SECTION_KEY, section, "a mapping of DiTCacheConfig fields, true, false or null")


def _find_sections(mapping: Mapping[str, Any], path: tuple[str, ...]):
    for key, value in mapping.items():
        if key == SECTION_KEY:
            yield (*path, key), value
        elif isinstance(value, Mapping):
            yield from _find_sections(value, (*path, str(key)))


def _read_yaml_source(source: str | Path) -> Mapping[str, Any]:
    path = Path(source)
    if path.is_file():
        return _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    preset = PRESET_DIR / f"{source}.yaml"
    if isinstance(source, str) and preset.is_file():
        return _parsed_preset(str(preset), preset.stat().st_mtime_ns)
    names = list_presets()
    raise DiTCacheConfigError(
        "<config>", str(source), "an existing YAML file or a preset: " + ", ".join(names),
        hint=did_you_mean(str(source), names) or "no such file or preset",
    )


@functools.lru_cache(maxsize=64)
def _parsed_preset(path: str, mtime_ns: int) -> Mapping[str, Any]:
    """A shipped preset's YAML, parsed once (a server opens a request per admission: parsing took
    about 10 ms). Callers build a new config from it, whose containers are their own."""
    return _parse_yaml(Path(path).read_text(encoding="utf-8"), path)


def _parse_yaml(text: str, origin: str) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DiTCacheConfigError("<yaml>", origin, "valid YAML", hint=str(exc).splitlines()[0]) from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise DiTCacheConfigError("<yaml>", origin, "a YAML mapping at the top level")
    return data


def list_presets() -> list[str]:
    """Names of the presets shipped in ``configs/`` (usable wherever a config is accepted)."""
    if not PRESET_DIR.is_dir():
        return []
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        names = list_presets()
        raise DiTCacheConfigError("<preset>", name, ", ".join(names), hint=did_you_mean(name, names))
    return path


# -- field checks -------------------------------------------------------------------------------


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise DiTCacheConfigError(name, value, "true or false")
    return value


def _check_choice(name: str, value: Any, choices: Sequence[str], aliases: Mapping[str, str] = {}) -> str:
    if isinstance(value, str):
        normalized = value.strip().lower()
        normalized = aliases.get(normalized, normalized)
        if normalized in choices:
            return normalized
    hint = did_you_mean(value, choices) if isinstance(value, str) else ""
    raise DiTCacheConfigError(name, value, ", ".join(repr(c) for c in choices), hint=hint)


def _check_number(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DiTCacheConfigError(name, value, f"a finite number >= {minimum}")
    if not math.isfinite(value) or value < minimum:
        raise DiTCacheConfigError(name, value, f"a finite number >= {minimum}")
    return float(value)


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None, hint: str = "") -> int:
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DiTCacheConfigError(name, value, allowed + " or null", hint=hint)
    if value < minimum or (maximum is not None and value > maximum):
        raise DiTCacheConfigError(name, value, allowed + " or null", hint=hint)
    return int(value)


def _check_active_steps(value: Any) -> tuple[int, int | None]:
    allowed = "[start, end] with 0 <= start < end, end null for 'to the last step'"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise DiTCacheConfigError("active_steps", value, allowed)
    start, end = value
    if not _is_int(start) or start < 0:
        raise DiTCacheConfigError("active_steps", value, allowed, hint="start must be an integer >= 0")
    if end is not None and (not _is_int(end) or end <= start):
        raise DiTCacheConfigError("active_steps", value, allowed, hint="end must be an integer > start, or null")
    return (int(start), None if end is None else int(end))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_compute_mask(value: Any) -> tuple[int, ...]:
    allowed = "a non-empty list of 0/1 per step (1 = must compute), or a string like '1110110'"
    if isinstance(value, str):
        if not value or set(value) - {"0", "1"}:
            raise DiTCacheConfigError("compute_mask", value, allowed)
        return tuple(int(c) for c in value)
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) and v in (0, 1) for v in value):
        return tuple(int(v) for v in value)
    raise DiTCacheConfigError("compute_mask", value, allowed)


def _check_options(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise DiTCacheConfigError("options", value, "a mapping of backend option names to values")
    for key, item in value.items():
        if not isinstance(key, str):
            raise DiTCacheConfigError("options", key, "option names that are strings")
        _check_plain(f"options.{key}", item)
    return _plain(value)


def _check_plain(name: str, value: Any) -> None:
    """Options must survive a YAML/JSON round trip, so only plain data is accepted."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DiTCacheConfigError(name, value, "a finite number")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DiTCacheConfigError(name, key, "string keys")
            _check_plain(f"{name}.{key}", item)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(f"{name}[{index}]", item)
        return
    raise DiTCacheConfigError(name, value, "plain data: numbers, strings, booleans, null, lists, mappings")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = [
    "BACKENDS",
    "DiTCacheConfig",
    "load_config",
    "list_presets",
    "preset_path",
    "field_names",
]
