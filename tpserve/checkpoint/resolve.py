"""What a model argument names: the embedded default model, a GGUF file, a tpserve checkpoint
(or the newest complete one under a training root) or a transformers directory."""

from __future__ import annotations

import os
from pathlib import Path

from .default_model import converted_gguf_path, default_model_path
from .verify import resolve_checkpoint


def resolve_model_path(model: str | os.PathLike | None, keep_q4: bool = False) -> Path:
    """A transformers directory or tpserve checkpoint for ``model``: None is the embedded default
    model, a training root (step subdirectories) its newest complete checkpoint. ``keep_q4``: a
    GGUF file (the default model's too) whose linear layers are all Q4_0 / Q4_1 keeps them 4-bit."""
    if model is None:
        return default_model_path(keep_q4)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist; pass a transformers model directory "
                                f"(config.json + *.safetensors) or omit --model for the default model")
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf_path(path, keep_q4)
    if path.is_dir():
        found = resolve_checkpoint(path)  # a tpserve checkpoint, or the newest complete one under a training root
        if found is not None:
            return found
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a transformers model directory")
    return path
