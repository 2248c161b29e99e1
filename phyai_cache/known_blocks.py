"""What the library knows about models' blocks, as data.

``KNOWN_MODELS`` describes the block lists of transformers whose blocks diffusers' registry does not
describe, so that ``blocks=None`` finds them without the user naming them:

* phyai's own model classes, each checked against phyai's real model by
  ``tests/integrations/test_phyai.py``;
* the diffusers families the registry has no (or no complete) entry for, keyed ``diffusers.<class
  name>`` (diffusers moves classes between modules; the name is what stays). Each was read from the
  model's forward and is checked by the support matrix (``tests/test_support_matrix.py``), which
  enables every family with ``blocks=None``: a wrong or missing entry fails there.

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
from collections.abc import Sequence
from dataclasses import dataclass
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


def _lists(*lists: str | dict[str, Any]) -> KnownModel:
    """A model's block lists in execution order: a path, or the BlockSpec fields of one list."""
    return KnownModel(blocks=tuple(dict(path=spec) if isinstance(spec, str) else spec for spec in lists))


def _one(path: str, **fields: Any) -> dict[str, Any]:
    return dict(path=path, **fields)


def _two_streams(path: str, hidden_index: int, encoder_arg: str | int = "encoder_hidden_states",
                 hidden_arg: str | int = "hidden_states") -> dict[str, Any]:
    """A list whose blocks take and return both streams (the second is the text stream, or the audio
    stream for LTX-2 and Kandinsky 6), the hidden states at ``hidden_index`` of the returned pair."""
    return dict(path=path, hidden_states_arg=hidden_arg, encoder_hidden_states_arg=encoder_arg,
                return_hidden_states_index=hidden_index, return_encoder_hidden_states_index=1 - hidden_index)


# The diffusers families (diffusers 0.42.1) whose blocks diffusers' registry does not describe: every
# list a model's forward runs, in that order, with the stream arguments and where a block returns them.
KNOWN_MODELS.update({
    "diffusers.AceStepTransformer1DModel": _lists("layers"),
    "diffusers.AllegroTransformer3DModel": _lists("transformer_blocks"),
    "diffusers.AnyFlowFARTransformer3DModel": _lists("blocks"),
    "diffusers.AnyFlowTransformer3DModel": _lists("blocks"),
    "diffusers.AuraFlowTransformer2DModel":
        _lists(_two_streams("joint_transformer_blocks", 1), "single_transformer_blocks"),
    "diffusers.BriaFibo2Transformer2DModel":
        _lists(_one("noise_refiner", hidden_states_arg="x"), _one("layers", hidden_states_arg="x")),
    "diffusers.BriaFiboTransformer2DModel": _lists(_two_streams("transformer_blocks", 1), "single_transformer_blocks"),
    "diffusers.ChromaTransformer2DModel": _lists(_two_streams("transformer_blocks", 1), "single_transformer_blocks"),
    "diffusers.ChronoEditTransformer3DModel": _lists("blocks"),
    "diffusers.CogView3PlusTransformer2DModel": _lists(_two_streams("transformer_blocks", 0)),
    "diffusers.ConsisIDTransformer3DModel": _lists(_two_streams("transformer_blocks", 0)),
    "diffusers.CosmosTransformer3DModel": _lists("transformer_blocks"),
    "diffusers.EasyAnimateTransformer3DModel": _lists(_two_streams("transformer_blocks", 0)),
    "diffusers.ErnieImageTransformer2DModel": _lists(_one("layers", hidden_states_arg="x")),
    "diffusers.Flux3Transformer2DModel": _lists(_two_streams("single_transformer_blocks", 1)),
    "diffusers.GlmImageTransformer2DModel": _lists(_two_streams("transformer_blocks", 0)),
    "diffusers.HeliosTransformer3DModel": _lists("blocks"),
    "diffusers.HiDreamImageTransformer2DModel": _lists(_two_streams("double_stream_blocks", 0), "single_stream_blocks"),
    "diffusers.HunyuanDiT2DModel": _lists("blocks"),
    "diffusers.HunyuanVideo15Transformer3DModel": _lists(_two_streams("transformer_blocks", 0)),
    "diffusers.Ideogram4Transformer2DModel": _lists("layers"),
    "diffusers.JoyImageEditPlusTransformer3DModel": _lists(_two_streams("double_blocks", 0)),
    "diffusers.JoyImageEditTransformer3DModel": _lists(_two_streams("double_blocks", 0)),
    "diffusers.Kandinsky6SRTransformer3DModel": _lists("visual_transformer_blocks"),
    "diffusers.Kandinsky6Transformer3DModel":
        _lists(_two_streams("visual_transformer_blocks", 0, encoder_arg=1, hidden_arg=0)),
    "diffusers.Krea2Transformer2DModel": _lists("transformer_blocks"),
    "diffusers.LTX2VideoTransformer3DModel":
        _lists(_two_streams("transformer_blocks", 0, encoder_arg="audio_hidden_states")),
    "diffusers.LongCatAudioDiTTransformer": _lists("blocks"),
    "diffusers.LongCatImageTransformer2DModel":
        _lists(_two_streams("transformer_blocks", 1), _two_streams("single_transformer_blocks", 1)),
    "diffusers.Lumina2Transformer2DModel": _lists("context_refiner", "noise_refiner", "layers"),
    "diffusers.LuminaNextDiT2DModel": _lists("layers"),
    "diffusers.MiniMaxH3Transformer3DModel": _lists("transformer_blocks"),
    "diffusers.MiniMaxMusic3Transformer1DModel": _lists("transformer_blocks"),
    "diffusers.NucleusMoEImageTransformer2DModel": _lists("transformer_blocks"),
    "diffusers.OmniGenTransformer2DModel": _lists("layers"),
    "diffusers.OvisImageTransformer2DModel":
        _lists(_two_streams("transformer_blocks", 1), _two_streams("single_transformer_blocks", 1)),
    "diffusers.PRXTransformer2DModel": _lists("blocks"),
    "diffusers.QwenImage21Transformer2DModel": _lists("transformer_blocks"),
    "diffusers.SanaTransformer2DModel": _lists("transformer_blocks"),
    "diffusers.SanaVideoTransformer3DModel": _lists("transformer_blocks"),
    "diffusers.SanaWMLTX2RefinerTransformer3DModel": _lists("transformer_blocks"),
    "diffusers.SanaWMTransformer3DModel": _lists(_one("blocks", hidden_states_arg="x")),
    "diffusers.SkyReelsV2Transformer3DModel": _lists("blocks"),
    "diffusers.StableAudio3DiTModel": _lists("transformer_blocks"),
    "diffusers.StableAudioDiTModel": _lists("transformer_blocks"),
    "diffusers.T5FilmDecoder": _lists(_one("decoders", return_hidden_states_index=0)),
    "diffusers.WanAnimateTransformer3DModel": _lists("blocks"),
})

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
    """What this module knows of ``model_class``, or None (diffusers classes by name, see the module doc)."""
    known = KNOWN_MODELS.get(f"{model_class.__module__}.{model_class.__qualname__}")
    if known is None and model_class.__module__.split(".")[0] == "diffusers":
        known = KNOWN_MODELS.get(f"diffusers.{model_class.__qualname__}")
    return known


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
