"""The dtype strings of safetensors (and of the ``.cllm`` header) and their torch dtypes and sizes."""

from __future__ import annotations

import torch

from .errors import FormatError

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored") from None


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name][0]


def itemsize(name: str) -> int:
    return DTYPES[name][1]
