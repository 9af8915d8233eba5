"""Which native class serves which ``architectures`` entry of a config.json."""

from __future__ import annotations

import json
from pathlib import Path

from .llama import LlamaForCausalLM

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
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def model_class(config) -> type:
    for arch in getattr(config, "architectures", None) or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(f"architecture {getattr(config, 'architectures', None)} is not supported; "
                     f"supported: {', '.join(ARCHITECTURES)}")
