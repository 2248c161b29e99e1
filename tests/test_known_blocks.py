"""phyai_cache/known_blocks.py: each correction of diffusers' block registry matches the real block,
and each model listed for running code between its blocks would be served wrong without the entry."""

from __future__ import annotations

import importlib

import pytest
from diffusers.hooks._helpers import TransformerBlockRegistry

import phyai_cache.known_blocks as known_blocks
from phyai_cache import DiTCacheConfigError, enable_dit_cache
from phyai_cache.blocks import discover_blocks
from phyai_cache_lab.testing.families import FAILED, FAMILIES, denoise, family, run_family

CORRECTED_FAMILIES = {
    "diffusers.models.transformers.transformer_bria.BriaTransformerBlock": ("bria", "transformer_blocks"),
    "diffusers.models.transformers.transformer_z_image.ZImageTransformerBlock": ("z-image", "layers"),
}


def test_every_correction_has_a_family_that_uses_it():
    assert set(CORRECTED_FAMILIES) == set(known_blocks.REGISTRY_CORRECTIONS)


@pytest.mark.parametrize("block_path", sorted(known_blocks.REGISTRY_CORRECTIONS))
def test_corrections_describe_the_real_block_and_differ_from_the_registry(block_path):
    module_name, class_name = block_path.rsplit(".", 1)
    block_class = getattr(importlib.import_module(module_name), class_name)
    registered = TransformerBlockRegistry.get(block_class)
    correction = known_blocks.REGISTRY_CORRECTIONS[block_path]
    differs = [key for key, value in correction.items()
               if getattr(registered, key.replace("_arg", "_argument_name"), None) != value]
    assert differs, "diffusers now registers this block correctly: drop the correction"

    name, path = CORRECTED_FAMILIES[block_path]
    fam = family(name)
    transformer = fam.build()
    spec = next(bl for bl in discover_blocks(transformer) if bl.path == path)
    seen = []

    def record(module, args, kwargs, output):
        seen.append((spec.io[0].hidden_in(args, kwargs), spec.io[0].encoder_in(args, kwargs), output))

    hook = spec.blocks[0].register_forward_hook(record, with_kwargs=True)
    try:
        denoise(fam, transformer, steps=1, branches=("cond",))
    finally:
        hook.remove()
    hidden_in, encoder_in, output = seen[0]
    hidden_out, encoder_out = spec.io[0].split(output)  # raises if the declared format is wrong
    assert hidden_out.shape == hidden_in.shape
    if correction.get("return_encoder_hidden_states_index") is not None:
        assert encoder_out.shape == encoder_in.shape


@pytest.mark.parametrize("model_class", sorted(known_blocks.CODE_BETWEEN_BLOCKS))
def test_models_with_code_between_blocks_are_refused_and_would_be_wrong_otherwise(model_class, monkeypatch):
    fam = next(f for f in FAMILIES if f.model_class == model_class)
    lists, _ = known_blocks.CODE_BETWEEN_BLOCKS[model_class]
    transformer = fam.build()
    with pytest.raises(DiTCacheConfigError, match="run one after the other with nothing in between") as info:
        enable_dit_cache(transformer, enabled=True, backend="native", strategy="fbcache")
    assert info.value.field == "blocks" and all(path in str(info.value) for path in lists)

    monkeypatch.delitem(known_blocks.CODE_BETWEEN_BLOCKS, model_class)
    cell = run_family(fam, [("native", "fbcache")])[0]
    assert cell.status == FAILED, cell
    assert ("a cached step with inputs identical to the computed one differs" in cell.reason
            or "ran out of order" in cell.reason), cell.reason


def test_wan_vace_without_its_entry_is_silently_wrong_on_every_block_backend(monkeypatch):
    """What the entry prevents: diffusers' FirstBlockCache adds the control hints twice too, and
    Cache-DiT (which runs the whole list as one module) changes even the computed steps."""
    monkeypatch.delitem(known_blocks.CODE_BETWEEN_BLOCKS, "WanVACETransformer3DModel")
    cells = {c.backend: c for c in run_family(family("wan-vace"), [("diffusers", "fbcache"), ("cache_dit", "fbcache")])}
    assert "a cached step with inputs identical to the computed one differs" in cells["diffusers"].reason
    assert "the first step (computed, same inputs as uncached) differs" in cells["cache_dit"].reason


def test_explicit_block_specs_are_checked_too():
    transformer = family("latte").build()
    with pytest.raises(DiTCacheConfigError, match="interleaved"):
        enable_dit_cache(transformer, blocks="temporal_transformer_blocks", enabled=True, strategy="fbcache")
    assert not any("forward" in m.__dict__ for m in transformer.modules())


DIFFUSERS_KNOWN = sorted(key for key in known_blocks.KNOWN_MODELS if key.startswith("diffusers."))


def test_every_known_diffusers_model_is_a_family_of_the_support_matrix():
    """An entry the matrix does not run would be unverified knowledge."""
    assert set(DIFFUSERS_KNOWN) <= {f"diffusers.{fam.model_class}" for fam in FAMILIES}


@pytest.mark.parametrize("key", DIFFUSERS_KNOWN)
def test_the_library_finds_the_known_blocks_itself_and_could_not_without_the_entry(key, monkeypatch):
    """``blocks=None`` resolves to the entry's lists; without the entry, diffusers' registry alone
    finds none, or not these (so no entry is dead weight). That the lists are *right* is the support
    matrix's job: it enables every family with ``blocks=None`` and checks what a cached step computes."""
    fam = next(f for f in FAMILIES if f"diffusers.{f.model_class}" == key)
    transformer = fam.build()
    expected = [fields["path"] for fields in known_blocks.KNOWN_MODELS[key].blocks]
    if type(transformer).__name__ not in known_blocks.CODE_BETWEEN_BLOCKS:
        assert [bl.path for bl in discover_blocks(transformer)] == expected

    def described(lists):  # what the cache reads and writes per list (BlockIO compares by identity)
        return [(bl.path, vars(bl.io[0])) for bl in lists]

    monkeypatch.delitem(known_blocks.KNOWN_MODELS, key)
    try:
        without = described(discover_blocks(transformer))
    except DiTCacheConfigError:
        return
    monkeypatch.undo()
    assert without != described(discover_blocks(transformer))
