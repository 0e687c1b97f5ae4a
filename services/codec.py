"""Tensor codec: torch <-> ``chitu.v1.Tensor`` / ``TensorChunk`` with a size cap.

Encoding makes exactly one copy (the tensor's bytes into the protobuf ``bytes`` field); decoding wraps the
received bytes with ``torch.frombuffer`` (no copy); chunk assembly writes each chunk once into a buffer
allocated on the first chunk. bf16/fp16 travel as raw bytes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator

import torch

from services.errors import InvalidArgument, ResourceExhausted
from services.proto.chitu.v1 import tensor_pb2

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
"""Chunk size for streamed tensors: 4 MiB streams at 0.6-0.9 GB/s on loopback (vs 0.14 GB/s unary)."""

DEFAULT_MAX_TENSOR_BYTES = 2 * 1024**3
"""Largest tensor a receiver accepts unless configured otherwise."""

_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.bool: tensor_pb2.DTYPE_BOOL,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _TO_PROTO.items()}


def proto_dtype(dtype: torch.dtype) -> int:
    try:
        return _TO_PROTO[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} cannot travel; supported: {sorted(str(d) for d in _TO_PROTO)}") from None


def torch_dtype(dtype: int, field: str = "tensor.dtype") -> torch.dtype:
    try:
        return _FROM_PROTO[dtype]
    except KeyError:
        valid = sorted(tensor_pb2.DType.Name(v) for v in _FROM_PROTO)
        raise InvalidArgument(f"{field}: unsupported dtype {dtype}; valid: {valid}") from None


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # view as bytes so that dtypes numpy lacks (bfloat16) need no conversion
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _check_size(nbytes: int, max_bytes: int, field: str) -> None:
    if nbytes > max_bytes:
        raise ResourceExhausted(f"{field}: tensor of {nbytes} bytes exceeds the cap of {max_bytes} bytes")


def to_proto(tensor: torch.Tensor, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, field: str = "tensor") -> tensor_pb2.Tensor:
    """Encode a tensor as one message (one copy)."""
    _check_size(tensor.numel() * tensor.element_size(), max_bytes, field)
    return tensor_pb2.Tensor(dtype=proto_dtype(tensor.dtype), shape=list(tensor.shape), data=_raw_bytes(tensor))


def _wrap(data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # frombuffer warns on read-only buffers; callers never write in place into decoded tensors
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _check_shape(shape: Iterable[int], field: str) -> list[int]:
    shape = list(shape)
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{field}.shape has a negative size: {shape}")
    return shape


def from_proto(msg: tensor_pb2.Tensor, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, field: str = "tensor") -> torch.Tensor:
    """Decode a Tensor message without copying its bytes; validates dtype, shape and length."""
    dtype = torch_dtype(msg.dtype, f"{field}.dtype")
    shape = _check_shape(msg.shape, field)
    expected = _nbytes(shape, dtype)
    _check_size(expected, max_bytes, field)
    if len(msg.data) != expected:
        raise InvalidArgument(f"{field}: shape {shape} of {dtype} needs {expected} bytes, got {len(msg.data)}")
    return _wrap(msg.data, dtype, shape)


def named_to_proto(tensors: dict[str, torch.Tensor], max_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> list[tensor_pb2.NamedTensor]:
    return [tensor_pb2.NamedTensor(name=k, tensor=to_proto(v, max_bytes, k)) for k, v in tensors.items()]


def named_from_proto(items: Iterable[tensor_pb2.NamedTensor], max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
                     field: str = "conditionings") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, item in enumerate(items):
        if not item.name:
            raise InvalidArgument(f"{field}[{i}].name must not be empty")
        if item.name in out:
            raise InvalidArgument(f"{field}: duplicate tensor name {item.name!r}")
        out[item.name] = from_proto(item.tensor, max_bytes, f"{field}[{item.name}]")
    return out


def iter_chunks(name: str, tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tensor_pb2.TensorChunk]:
    """Split a tensor into self-describing chunks (one copy of the bytes in total)."""
    if chunk_bytes <= 0:
        chunk_bytes = DEFAULT_CHUNK_BYTES
    raw = memoryview(_raw_bytes(tensor))
    total = len(raw)
    header = {"name": name, "dtype": proto_dtype(tensor.dtype), "shape": list(tensor.shape), "total_bytes": total}
    if total == 0:
        yield tensor_pb2.TensorChunk(offset=0, data=b"", **header)
        return
    for offset in range(0, total, chunk_bytes):
        yield tensor_pb2.TensorChunk(offset=offset, data=bytes(raw[offset:offset + chunk_bytes]), **header)


class ChunkAssembler:
    """Reassembles one tensor from in-order TensorChunk messages."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, field: str = "latents"):
        self._max_bytes = max_bytes
        self._field = field
        self._buf: bytearray | None = None
        self._received = 0
        self.name = ""
        self.dtype: torch.dtype | None = None
        self.shape: list[int] = []

    def add(self, chunk: tensor_pb2.TensorChunk) -> bool:
        """Add a chunk; returns True once the tensor is complete."""
        if self._buf is None:
            self.dtype = torch_dtype(chunk.dtype, f"{self._field}.dtype")
            self.shape = _check_shape(chunk.shape, self._field)
            self.name = chunk.name
            expected = _nbytes(self.shape, self.dtype)
            _check_size(expected, self._max_bytes, self._field)
            if chunk.total_bytes != expected:
                raise InvalidArgument(f"{self._field}: total_bytes {chunk.total_bytes} does not match shape "
                                      f"{self.shape} of {self.dtype} ({expected} bytes)")
            self._buf = bytearray(expected)
        elif list(chunk.shape) != self.shape or chunk.name != self.name or chunk.total_bytes != len(self._buf):
            raise InvalidArgument(f"{self._field}: chunk header changed mid-tensor")
        if chunk.offset != self._received:
            raise InvalidArgument(f"{self._field}: chunk at offset {chunk.offset}, expected {self._received}")
        end = chunk.offset + len(chunk.data)
        if end > len(self._buf):
            raise InvalidArgument(f"{self._field}: chunk runs past the end ({end} > {len(self._buf)})")
        self._buf[chunk.offset:end] = chunk.data
        self._received = end
        return self.complete

    @property
    def started(self) -> bool:
        return self._buf is not None

    @property
    def complete(self) -> bool:
        return self._buf is not None and self._received == len(self._buf)

    def tensor(self) -> torch.Tensor:
        if not self.complete:
            raise InvalidArgument(f"{self._field}: stream ended after {self._received} bytes; tensor incomplete")
        assert self.dtype is not None and self._buf is not None
        return _wrap(self._buf, self.dtype, self.shape)
