"""Resuming training: optimizer state saved sharded beside the weights, read back at any TP degree.

An optimizer's per-parameter tensors (AdamW's moments, SGD's momentum) have their parameter's
shape, so they are cut the way the parameter is: each is stored as a tensor named
``state.<parameter name>.<key>`` with the parameter's layout, in a tpserve checkpoint of its own
in the ``optimizer/`` subdirectory, and loading at another degree reads each rank's new slice,
as the weights are read. Scalars (``step``) and hyper-parameters go to ``optimizer.json``, with
parameters named rather than numbered, so the file means the same whatever the TP degree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tpserve.parallel.agree import gather_agreed
from tpserve.parallel.comm import get_group, group_rank
from tpserve.parallel.shards import Shard, param_shards
from tpserve.parallel.training import model_group
from tpserve.utils.dtypes import DTYPE_NAME, MODEL_DTYPE_NAMES
from tpserve.utils.fs import fsync_path

from .load import _fill, _open_rank, load_sharded_weights, plan_reads
from .manifest import read_manifest
from .safetensors_io import CheckpointError
from .sharded import OPTIMIZER_DIR, _caught
from .verify import resolve_checkpoint

OPTIMIZER_META = "optimizer.json"
_INTS = {"int64": torch.int64, "int32": torch.int32}


def state_name(param: str, key: str) -> str:
    return f"state.{param}.{key}"


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model's name of each parameter the optimizer holds, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(f"the optimizer's param_groups[{g}] holds a parameter of shape {list(p.shape)} that "
                                 f"is not one of the model's: build the optimizer from model.parameters()")
            out.append(names[id(p)])
    return out


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """``(tensors, shards, meta)``: this rank's state tensors and their layouts, and the JSON part."""
    names = _param_names(model, optimizer)
    shards = param_shards(model)
    state = optimizer.state_dict()
    tensors, layouts, scalars, keys = {}, {}, {}, {}
    params = dict(model.named_parameters())
    for index, st in state["state"].items():
        pname = names[index]
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if tuple(value.shape) != tuple(params[pname].shape):
                    raise ValueError(f"optimizer state {key!r} of {pname} has shape {list(value.shape)}, not its "
                                     f"parameter's {list(params[pname].shape)}: tpserve can save per-parameter state "
                                     f"only in the parameter's shape (AdamW, Adam, SGD, RMSprop, ...)")
                name = state_name(pname, key)
                tensors[name] = value.detach()
                layouts[name] = shards[pname]
                keys.setdefault(pname, []).append(key)
            elif isinstance(value, torch.Tensor):
                scalars.setdefault(pname, {})[key] = {"tensor": DTYPE_NAME[value.dtype], "value": value.item()}
            else:
                scalars.setdefault(pname, {})[key] = {"value": value}
    groups = []
    for group in state["param_groups"]:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [names[i] for i in group["params"]]
        groups.append(g)
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars, "tensors": keys}
    return tensors, layouts, meta


def write_meta(directory: Path, meta: dict) -> None:
    path = directory / OPTIMIZER_META
    try:
        path.write_text(json.dumps(meta, indent=1) + "\n")
    except TypeError as exc:
        raise ValueError(f"the optimizer's param_groups hold a value JSON cannot store ({exc}); keep "
                         f"hyper-parameters plain numbers, strings or lists") from None
    fsync_path(path)


def _scalar(spec: dict):
    if "tensor" not in spec:
        return spec["value"]
    dtype = MODEL_DTYPE_NAMES.get(spec["tensor"]) or _INTS.get(spec["tensor"], torch.float32)
    return torch.tensor(spec["value"], dtype=dtype)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, rank: int) -> None:
    """Fill ``optimizer`` from ``path/optimizer`` with this rank's slices (any TP degree)."""
    directory = path / OPTIMIZER_DIR
    meta_path = directory / OPTIMIZER_META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: holds no optimizer state ({OPTIMIZER_DIR}/{OPTIMIZER_META} is missing); it was "
                              f"saved without save_checkpoint(..., optimizer=opt)")
    meta = json.loads(meta_path.read_text())
    if meta["class"] != type(optimizer).__name__:
        raise ValueError(f"{path}: the optimizer state is {meta['class']}'s, not {type(optimizer).__name__}'s: "
                         f"build the same optimizer before loading")
    names = _param_names(model, optimizer)
    saved = [n for g in meta["param_groups"] for n in g["params"]]
    if saved != names:
        missing = sorted(set(saved) ^ set(names))
        raise ValueError(f"{path}: the optimizer was saved over other parameters than this one holds "
                         f"({', '.join(missing[:3]) or 'a different order'}); build it as it was built for training")
    shards: dict[str, Shard] = param_shards(model)
    manifest = read_manifest(directory) if meta["tensors"] else None
    params = dict(model.named_parameters())
    files: dict = {}
    state: dict[int, dict] = {}
    for index, pname in enumerate(names):
        st = {key: _scalar(spec) for key, spec in meta["scalars"].get(pname, {}).items()}
        for key in meta["tensors"].get(pname, []):
            tname = state_name(pname, key)
            pieces = plan_reads(manifest, tname, shards[pname], rank)
            for r in {p.rank for p in pieces} - files.keys():
                files[r] = _open_rank(manifest, r)
            out = torch.empty(params[pname].shape, dtype=manifest.tensors[tname].dtype)
            _fill(out, pieces, manifest, files)
            st[key] = out
        if st:
            state[index] = st
    groups, start = [], 0
    for g in meta["param_groups"]:
        group = {k: v for k, v in g.items() if k != "params"}
        group["params"] = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
                    group: dist.ProcessGroup | None = None) -> Path:
    """Fill ``model`` (built at any TP degree, native or ``parallelize()``d) and, if given,
    ``optimizer`` from a checkpoint :func:`save_checkpoint` wrote, to resume training. Every
    rank calls it; an error on any rank is raised on all of them. ``path`` may be a training
    root: its newest complete checkpoint is used. Returns the checkpoint's path."""
    group = get_group(group) if group is not None else model_group(model)
    found, err = None, None
    try:
        found = resolve_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: not a tpserve checkpoint (no manifest); save one with save_checkpoint")
    except Exception as exc:
        err = _caught(exc)
    gather_agreed(None, err, group, CheckpointError)
    load_sharded_weights(model, found, group, progress=False, zero_copy=False)  # trained in place: no file views
    if optimizer is not None:
        err = None
        try:
            load_optimizer_state(model, optimizer, found, group_rank(group))
        except Exception as exc:
            err = _caught(exc)
        gather_agreed(None, err, group, CheckpointError, (ValueError, FileExistsError))
    return found
