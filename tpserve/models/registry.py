"""Which native class serves which ``architectures`` entry of a config.json."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from .llama import LIGHT_ROPE_TYPES, LlamaForCausalLM

# One implementation covers the family; the config says which variant.
ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def load_config(path: str | Path):
    """The transformers config of a checkpoint directory, after checking its architecture."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json here; pass a transformers model directory, a GGUF file "
                                f"or a tpserve checkpoint")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file}: not valid JSON ({exc})") from None
    archs = raw.get("architectures") or []
    supported = [a for a in archs if a in ARCHITECTURES]
    if not supported:
        raise ValueError(f"{cfg_file}: architecture {archs or '(none given)'} is not supported; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    light = _light_config(raw)
    if light is not None:
        return light
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


# Keys a config.json must spell out for the light reader; anything less goes to transformers,
# which knows each architecture's defaults.
_REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
_OPTIONAL = {"num_key_value_heads": None, "head_dim": None, "hidden_act": "silu", "attention_bias": False,
             "mlp_bias": False, "sliding_window": None, "use_sliding_window": False}


def _light_config(raw: dict) -> SimpleNamespace | None:
    """A plain namespace for a complete config with a rope we compute ourselves.

    Importing transformers' config machinery costs ~1.5 s and ~80 MB per rank (it pulls in
    torch.distributed.tensor and the model-loading stack), more than reading a 135M model's
    shard; complete configs, which save_pretrained writes, don't need it.
    """
    if any(k not in raw for k in _REQUIRED):
        return None
    rope = raw.get("rope_parameters")
    if rope is None:  # the older spelling: rope_theta plus rope_scaling
        rope = dict(raw.get("rope_scaling") or {"rope_type": "default"})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = raw.get("rope_theta", 10000.0)
    if not isinstance(rope, dict) or rope.get("rope_type") not in LIGHT_ROPE_TYPES or "rope_theta" not in rope:
        return None
    cfg = {**_OPTIONAL, **raw, "rope_parameters": rope}
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return SimpleNamespace(**cfg)


def model_class(config) -> type:
    for arch in getattr(config, "architectures", None) or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(f"architecture {getattr(config, 'architectures', None)} is not supported; "
                     f"supported: {', '.join(ARCHITECTURES)}")
