"""The one dtype table: each torch dtype tpserve handles, with its safetensors code, the name
config.json and users write, and the other names users may give. Quantized types join here."""

from __future__ import annotations

import torch

# torch dtype, safetensors code, name (config.json "torch_dtype", --dtype), other names for --dtype
_TABLE: list[tuple[torch.dtype, str, str, tuple[str, ...]]] = [
    (torch.float64, "F64", "float64", ()),
    (torch.float32, "F32", "float32", ("fp32",)),
    (torch.float16, "F16", "float16", ("fp16", "half")),
    (torch.bfloat16, "BF16", "bfloat16", ("bf16",)),
    (torch.int64, "I64", "int64", ()),
    (torch.int32, "I32", "int32", ()),
    (torch.int16, "I16", "int16", ()),
    (torch.int8, "I8", "int8", ()),
    (torch.uint8, "U8", "uint8", ()),
    (torch.bool, "BOOL", "bool", ()),
    (torch.float8_e4m3fn, "F8_E4M3", "float8_e4m3fn", ()),
    (torch.float8_e5m2, "F8_E5M2", "float8_e5m2", ()),
]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {code: dt for dt, code, _, _ in _TABLE}  # "F32" -> torch.float32
SAFETENSORS_CODES: dict[torch.dtype, str] = {dt: code for dt, code, _, _ in _TABLE}  # torch.float32 -> "F32"
DTYPE_NAME: dict[torch.dtype, str] = {dt: name for dt, _, name, _ in _TABLE}  # torch.float32 -> "float32"
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what a model can compute in
# what --dtype / dtype= accept: each model dtype's name and its other names
MODEL_DTYPE_NAMES: dict[str, torch.dtype] = {n: dt for dt, _, name, more in _TABLE if dt in MODEL_DTYPES
                                             for n in (name, *more)}
