"""Tensor-parallel building blocks: partition rule, collectives, layers and ``parallelize``."""

from .comm import (
    CommError,
    all_gather,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    broadcast_tensor,
    gather_to_rank0,
    get_group,
    group_rank,
    group_size,
    group_timeout,
    patience,
    set_default_timeout,
    set_group_timeout,
)
from .config import TensorParallelConfig, init_distributed
from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from .parallelize import DistributedModelWrapper, infer_plan, parallelize
from .partition import PartitionError, head_ranges, partition_range, partition_sizes
from .regions import copy_to_tp_region, gather_from_tp_region, reduce_from_tp_region, scatter_to_tp_region
from .rng import manual_seed, sharded_region
from .training import check_replicated_grads, clip_grad_norm_, grad_norm

__all__ = [
    "CommError", "all_gather", "all_gather_object", "all_reduce_sum", "barrier", "broadcast_object", "broadcast_tensor",
    "gather_to_rank0", "get_group", "group_rank", "group_size", "group_timeout", "patience", "set_default_timeout",
    "set_group_timeout",
    "TensorParallelConfig", "init_distributed",
    "ColumnParallelLinear", "ParallelLMHead", "RowParallelLinear", "VocabParallelEmbedding",
    "DistributedModelWrapper", "infer_plan", "parallelize",
    "PartitionError", "head_ranges", "partition_range", "partition_sizes",
    "copy_to_tp_region", "gather_from_tp_region", "reduce_from_tp_region", "scatter_to_tp_region",
    "manual_seed", "sharded_region", "check_replicated_grads", "clip_grad_norm_", "grad_norm",
]
