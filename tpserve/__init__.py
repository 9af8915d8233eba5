"""tpserve: tensor-parallel LLM inference in plain PyTorch."""

__version__ = "0.1.0"

from .parallel import DistributedModelWrapper, parallelize  # noqa: E402

__all__ = ["DistributedModelWrapper", "parallelize", "__version__"]
