"""Modules that stand in for ``nn.Linear`` / ``nn.Embedding`` and keep their weights quantized or compressed.

Each exposes ``in_features``, ``out_features`` (or ``num_embeddings``, ``embedding_dim``) and ``bias`` like
the module it replaces. On the CPU the weight is dequantized for the call and dropped after it; on CUDA the
int8 weight goes straight into a fused weight-only matmul (``codecllm.gpu``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codecs import decode, get_codec
from .format import DTYPES


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` for an int8 ``[out, in]`` weight and float32 ``scale``."""
    if x.is_cuda:
        from .gpu.int8_matmul import int8_linear as fused

        return fused(x, qweight, scale, bias)
    w = (qweight.to(torch.float32) * scale[:, None]).to(x.dtype)
    return F.linear(x, w, bias)


class Int8Linear(nn.Module):
    """A Linear layer whose weight stays int8 with one float32 scale per output channel.

    >>> lin = Int8Linear(torch.ones(2, 3, dtype=torch.int8), torch.tensor([0.5, 2.0]))
    >>> lin(torch.ones(1, 3))
    tensor([[1.5000, 6.0000]])
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = bias

    runner = None  # on CUDA, ``codecllm.gpu.fusion`` may run this layer together with its siblings
    _row = None  # on CUDA: the prepared one-row matmul (``codecllm.gpu.int8_matmul.RowMatmul``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runner is not None:
            return self.runner(self, x)
        return self.plain(x)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.numel() == self.in_features:  # one token: the decode step's hot path
            row = self.row_matmul()
            if row is not None:
                return row(x)
        return int8_linear(x, self.qweight, self.scale, self.bias)

    def row_matmul(self):
        """The one-row matmul prepared for this layer's current tensors (None where their layout has none)."""
        row, q, s, b = self._row, self.qweight, self.scale, self.bias
        if row is None or row.qweight is not q or row.scale is not s or row.bias is not b:
            from .gpu.int8_matmul import RowMatmul

            try:
                row = RowMatmul(q, s, b)
            except ValueError:
                return None
            self._row = row
        return row

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """An embedding table stored int8 per row (the layout an int8 tied ``lm_head`` shares)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).to(torch.float32)
        return (rows * self.scale[ids].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class StreamLinear(nn.Module):
    """A Linear layer whose weight stays entropy-coded; it is decoded on every call.

    On the CPU the decode runs through the codec registry; on CUDA, ``codecllm.gpu`` swaps in a decoder
    that works from device memory into a shared workspace.
    """

    def __init__(self, payload: torch.Tensor, record, scale: torch.Tensor | None, bias: nn.Parameter | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = record.shape
        self.scheme = record.scheme
        self.codec = record.codec
        self.chunks = list(record.chunks)
        self.chunk_size = record.chunk_size or 0
        self.encoded_nbytes = record.encoded_nbytes
        self.encoded_dtype = DTYPES[record.encoded_dtype][0]
        self.dtype = dtype
        self.register_buffer("payload", payload)
        self.register_buffer("scale", scale)
        self.bias = bias

    def decoded(self) -> torch.Tensor:
        raw = decode(get_codec(self.codec), self.payload.numpy(), self.chunks, self.chunk_size, self.encoded_nbytes)
        return torch.from_numpy(raw).view(self.encoded_dtype).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.decoded()
        if self.scheme == "int8":
            return int8_linear(x, enc, self.scale, self.bias)
        return F.linear(x, enc.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.scheme}+{self.codec}"
