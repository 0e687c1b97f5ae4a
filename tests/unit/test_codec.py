"""Tensor codec: round trips for every dtype, chunking, caps and malformed input."""

from __future__ import annotations

import pytest
import torch

from services import codec
from services.errors import InvalidArgument, ResourceExhausted
from services.proto.chitu.v1 import tensor_pb2

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8, torch.float64]


def _sample(dtype: torch.dtype, shape=(3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype(dtype: torch.dtype) -> None:
    t = _sample(dtype)
    msg = codec.to_proto(t)
    assert msg.dtype != tensor_pb2.DTYPE_UNSPECIFIED and list(msg.shape) == [3, 5, 7]
    back = codec.from_proto(msg)
    assert back.dtype == dtype and torch.equal(back, t)


def test_non_contiguous_and_scalar_and_empty() -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    assert torch.equal(codec.from_proto(codec.to_proto(t)), t)
    s = torch.tensor(3.5)
    assert torch.equal(codec.from_proto(codec.to_proto(s)), s)
    e = torch.empty(0, 4)
    assert codec.from_proto(codec.to_proto(e)).shape == (0, 4)


@pytest.mark.parametrize("chunk", [1024, 4096, 10_000, 1 << 22])
def test_chunks_reassemble(chunk: int) -> None:
    t = _sample(torch.bfloat16, (2, 300, 64))
    chunks = list(codec.iter_chunks("latents", t, chunk))
    assert len(chunks) == -(-t.numel() * 2 // chunk)
    asm = codec.ChunkAssembler()
    done = [asm.add(c) for c in chunks]
    assert done[-1] and not any(done[:-1])
    assert asm.name == "latents" and torch.equal(asm.tensor(), t)


def test_chunk_errors() -> None:
    t = _sample(torch.float32, (64, 64))
    chunks = list(codec.iter_chunks("x", t, 4096))
    asm = codec.ChunkAssembler()
    asm.add(chunks[0])
    with pytest.raises(InvalidArgument, match="offset"):
        asm.add(chunks[2])
    asm = codec.ChunkAssembler()
    asm.add(chunks[0])
    with pytest.raises(InvalidArgument, match="incomplete"):
        asm.tensor()
    bad = tensor_pb2.TensorChunk(name="x", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4], total_bytes=8, data=b"")
    with pytest.raises(InvalidArgument, match="total_bytes"):
        codec.ChunkAssembler().add(bad)


def test_caps_and_malformed_messages() -> None:
    huge = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1 << 20, 1 << 10], data=b"")
    with pytest.raises(ResourceExhausted, match="cap"):
        codec.from_proto(huge, max_bytes=1 << 30, field="initial_latents")
    with pytest.raises(ResourceExhausted):
        codec.to_proto(torch.zeros(1024), max_bytes=100)
    short = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4], data=b"\0" * 15)
    with pytest.raises(InvalidArgument, match="needs 16 bytes"):
        codec.from_proto(short)
    with pytest.raises(InvalidArgument, match="dtype"):
        codec.from_proto(tensor_pb2.Tensor(shape=[1], data=b"\0" * 4))
    with pytest.raises(InvalidArgument, match="negative"):
        codec.from_proto(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1], data=b""))
    with pytest.raises(InvalidArgument, match="duplicate"):
        codec.named_from_proto(codec.named_to_proto({"a": torch.zeros(1)}) * 2)


def test_decode_does_not_copy() -> None:
    t = _sample(torch.float32, (256, 256))
    msg = codec.to_proto(t)
    back = codec.from_proto(msg)
    # the decoded tensor views the message's buffer (no copy on receive)
    assert back.untyped_storage().nbytes() == len(msg.data)
