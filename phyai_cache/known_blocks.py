"""What the library knows about models' blocks, as data.

``KNOWN_MODELS`` describes the block lists of transformers diffusers does not describe: phyai's own
model classes, found without the user naming them (``blocks=None``). Each entry is checked against
phyai's real model by ``tests/integrations/test_phyai.py``.

:mod:`phyai_cache.blocks` reads how a block takes and returns its streams from diffusers'
``TransformerBlockRegistry``. For a few block classes that entry does not match the block (found by
the support matrix, :mod:`phyai_cache_lab.testing.families`, which runs every family diffusers ships);
the correct description is given here, keyed by the block class's module and name. Each entry is
checked against the real block by ``tests/test_known_blocks.py``.

``CODE_BETWEEN_BLOCKS`` names models that run code of their own between the blocks of a list (an
interleaved second list, hints or adapter outputs added to the hidden states). On a cached step that
code still runs, so a residual taken over several blocks would contain its contribution and it would
be added a second time; no block spec can describe such a list. The lists are refused at enable time
instead of giving silently wrong outputs (or failing at the first call).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

from .errors import DiTCacheConfigError

@dataclass(frozen=True)
class KnownModel:
    """A model class's block lists (BlockSpec fields, in execution order) and its token streams.

    ``tail_streams`` name the call arguments whose tokens the model appends, in this order, after its
    main (latent) tokens in the blocks' sequence; each adds ``argument.shape[1]`` tokens when the call
    passes it. A decision measured over the whole sequence is dominated by the main tokens, so the
    native engine measures each stream on its own and decides on the worst (``options.streams``).
    """

    blocks: tuple[dict[str, Any], ...]
    tail_streams: tuple[str, ...] = ()


KNOWN_MODELS: dict[str, KnownModel] = {
    # phyai's Cosmos3 (video, video + sound, and the policy variant whose action tokens ride in the same
    # sequence): forward runs the GEN layers only; each gets its own layer's UND text K/V (one entry
    # per batch row) and the GEN rope table (shared). The UND text tower (language_model.layers) runs
    # once per branch in encode_condition, outside the denoising call, and is not cached. Action or
    # sound tokens (never both) follow the video tokens.
    "phyai.models.cosmos3.modeling_cosmos3.Cosmos3Transformer": KnownModel(
        blocks=(dict(path="gen_layers", row_args=("k_und", "v_und"), shared_args=("freqs_cos", "freqs_sin")),),
        tail_streams=("action_latents", "sound_latents"),
    ),
    # phyai's Qwen-Image 2.1 (newer than the snapshot): each block returns (hidden, its prefix K/V or
    # None); step 0 of a branch extracts the K/V (return_prefix_kv=True, never cached:
    # decision.stores_state), later steps pass each block its own stored pair (prefix_kv). Checked
    # against a stand-in built from phyai's call pattern (phyai_cache_lab.testing.qwen_image_21).
    "phyai.models.qwen_image_21.modeling_qwen_image_21.QwenImage21Transformer": KnownModel(
        blocks=(dict(path="transformer_blocks", return_hidden_states_index=0, return_length=2,
                     row_args=("modulation", "prefix_kv"), shared_args=("condition", "rope", "attn_ctx")),),
    ),
}

REGISTRY_CORRECTIONS: dict[str, dict[str, Any]] = {
    # Registered like a one-stream block (hidden states at index 0, no encoder stream), but it takes
    # and returns both streams: ``return encoder_hidden_states, hidden_states`` (diffusers 0.42.1).
    "diffusers.models.transformers.transformer_bria.BriaTransformerBlock": dict(
        encoder_hidden_states_arg="encoder_hidden_states",
        return_hidden_states_index=1,
        return_encoder_hidden_states_index=0,
    ),
    # Registered without an argument name, so it defaults to ``hidden_states``; the block's first
    # parameter is ``x`` (``forward(self, x, attn_mask, freqs_cis, ...)``).
    "diffusers.models.transformers.transformer_z_image.ZImageTransformerBlock": dict(hidden_states_arg="x"),
}

CODE_BETWEEN_BLOCKS: dict[str, tuple[tuple[str, ...], str]] = {
    "LatteTransformer3DModel": (
        ("transformer_blocks", "temporal_transformer_blocks"),
        "runs transformer_blocks and temporal_transformer_blocks interleaved, one block of each in turn",
    ),
    "WanVACETransformer3DModel": (("blocks",), "adds a VACE control hint after each block listed in vace_layers"),
    "ConsisIDTransformer3DModel": (
        ("transformer_blocks",), "adds a face cross-attention output after every cross_attn_interval-th block"),
    "WanAnimateTransformer3DModel": (
        ("blocks",), "adds the face adapter's output after every inject_face_latents_blocks-th block"),
}


def known_model(model_class: type) -> KnownModel | None:
    """What this module knows of ``model_class``, or None."""
    return KNOWN_MODELS.get(f"{model_class.__module__}.{model_class.__qualname__}")


def corrected(block_class: type, spec: Any) -> Any:
    """``spec`` (a BlockSpec read from diffusers' registry) with this module's correction applied."""
    fields = REGISTRY_CORRECTIONS.get(f"{block_class.__module__}.{block_class.__qualname__}")
    return dataclasses.replace(spec, **fields) if fields else spec


def check_no_code_between_blocks(model: Any, paths: Sequence[str]) -> None:
    """Refuse block lists between whose blocks the model runs code of its own (see the module doc)."""
    lists, what = CODE_BETWEEN_BLOCKS.get(type(model).__name__, ((), ""))
    chosen = [path for path in paths if path in lists]
    if chosen:
        raise DiTCacheConfigError(
            "blocks", list(paths), "block lists whose blocks run one after the other with nothing in between",
            hint=f"{type(model).__name__} {what}; that code still runs on a cached step, so a residual over "
                 f"several blocks would add its contribution twice; no block spec describes {', '.join(chosen)} "
                 "(the attention-level strategies pab and fastercache of backend 'diffusers' do not need one)",
        )
