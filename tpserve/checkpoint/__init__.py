"""Checkpoints: reading them, converting GGUF files, and the embedded default model (SmolLM2-135M-Instruct)."""
