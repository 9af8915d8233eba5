"""The model's tokenizer and its end-of-sequence ids, found the way transformers finds them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .detokenizer import has_tokenizer_files


def load_tokenizer(model_path: Path, tokenizer: str | os.PathLike | None, skip: bool):
    """The tokenizer for ``model_path``, or None when the model has no tokenizer files (token-id
    prompts still work) or ``skip`` is set. ``tokenizer`` names another directory to load it from."""
    if skip:
        return None
    source = model_path
    if tokenizer is not None:
        source = Path(tokenizer).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"tokenizer path {str(source)!r} does not exist; pass a directory with "
                                    f"tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    elif not has_tokenizer_files(model_path):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:  # transformers says many things here; say what to do about it
        raise ValueError(f"could not load the tokenizer from {source}: {type(exc).__name__}: {exc}; pass "
                         f"tokenizer=PATH (--tokenizer PATH) to a directory with a working tokenizer, or "
                         f"skip_tokenizer_init=True to use token-id prompts only") from None


def eos_token_ids(model_path: Path, config, tokenizer) -> set[int]:
    """End-of-sequence ids: generation_config.json's (else config.json's), and the tokenizer's."""
    ids: set[int] = set()
    eos = None
    gen = model_path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
