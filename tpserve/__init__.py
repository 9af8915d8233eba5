"""tpserve: tensor-parallel LLM inference in plain PyTorch."""

__version__ = "0.1.0"

from .engine.llm import LLM, CompletionOutput, RequestOutput  # noqa: E402
from .engine.sampling import SamplingParams  # noqa: E402
from .models.loading import load_model  # noqa: E402
from .parallel import DistributedModelWrapper, parallelize  # noqa: E402
from .checkpoint.sharded import find_latest_checkpoint, save_checkpoint  # noqa: E402

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "load_model",
           "DistributedModelWrapper", "parallelize", "save_checkpoint", "find_latest_checkpoint", "__version__"]
