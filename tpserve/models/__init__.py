"""Native tensor-parallel models and rank-sliced loading."""

from .llama import LlamaForCausalLM, Spec
from .loading import load_model, load_weights
from .registry import ARCHITECTURES, load_config, model_class

__all__ = ["ARCHITECTURES", "LlamaForCausalLM", "Spec", "load_config", "load_model", "load_weights", "model_class"]
