"""The fixed random model and prompts the engine's recorded reference outputs were made with."""

from pathlib import Path

import torch

# lengths cross several 16-token blocks; two prompts share a 40-token prefix
_SHARED = [(11 * i + 3) % 150 + 4 for i in range(40)]
PROMPTS = [
    [5, 17, 33, 2, 91, 7, 64],
    [120, 3],
    _SHARED + [9, 8, 7],
    _SHARED + [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70],
    [(7 * i) % 150 + 4 for i in range(70)],
]
SAMPLING = {
    "greedy": dict(max_tokens=24, temperature=0.0, ignore_eos=True),
    "seeded": dict(max_tokens=24, temperature=0.8, top_p=0.9, top_k=40, seed=1234, ignore_eos=True),
}


def save_reference_model(path: Path) -> str:
    """A random Llama with SmolLM2's head layout (9 query / 3 KV heads, tied embeddings)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=160, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                         max_position_embeddings=256, initializer_range=0.1, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)
