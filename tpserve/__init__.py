"""tpserve: tensor-parallel LLM inference in plain PyTorch."""

from .checkpoint.resume import load_checkpoint
from .checkpoint.save import save_checkpoint
from .checkpoint.verify import find_latest_checkpoint
from .engine.llm import LLM, CompletionOutput, RequestOutput
from .engine.sampling import SamplingParams
from .models.loading import load_model
from .parallel import DistributedModelWrapper, parallelize
from .version import __version__

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "load_model",
           "DistributedModelWrapper", "parallelize", "save_checkpoint", "load_checkpoint", "find_latest_checkpoint", "__version__"]
