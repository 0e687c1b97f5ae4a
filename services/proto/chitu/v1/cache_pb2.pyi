from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CachePolicy(_message.Message):
    __slots__ = ("teacache", "first_block", "magcache", "meancache", "taylorseer", "blockdance", "dbcache", "pab")
    TEACACHE_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    MAGCACHE_FIELD_NUMBER: _ClassVar[int]
    MEANCACHE_FIELD_NUMBER: _ClassVar[int]
    TAYLORSEER_FIELD_NUMBER: _ClassVar[int]
    BLOCKDANCE_FIELD_NUMBER: _ClassVar[int]
    DBCACHE_FIELD_NUMBER: _ClassVar[int]
    PAB_FIELD_NUMBER: _ClassVar[int]
    teacache: TeaCacheConfig
    first_block: FirstBlockCacheConfig
    magcache: MagCacheConfig
    meancache: MeanCacheConfig
    taylorseer: TaylorSeerConfig
    blockdance: BlockDanceConfig
    dbcache: DBCacheConfig
    pab: PABConfig
    def __init__(self, teacache: _Optional[_Union[TeaCacheConfig, _Mapping]] = ..., first_block: _Optional[_Union[FirstBlockCacheConfig, _Mapping]] = ..., magcache: _Optional[_Union[MagCacheConfig, _Mapping]] = ..., meancache: _Optional[_Union[MeanCacheConfig, _Mapping]] = ..., taylorseer: _Optional[_Union[TaylorSeerConfig, _Mapping]] = ..., blockdance: _Optional[_Union[BlockDanceConfig, _Mapping]] = ..., dbcache: _Optional[_Union[DBCacheConfig, _Mapping]] = ..., pab: _Optional[_Union[PABConfig, _Mapping]] = ...) -> None: ...

class TeaCacheConfig(_message.Message):
    __slots__ = ("threshold", "warmup_steps", "coefficients")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    warmup_steps: int
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, threshold: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., coefficients: _Optional[_Iterable[float]] = ...) -> None: ...

class FirstBlockCacheConfig(_message.Message):
    __slots__ = ("threshold", "warmup_steps", "max_consecutive_hits")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONSECUTIVE_HITS_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    warmup_steps: int
    max_consecutive_hits: int
    def __init__(self, threshold: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., max_consecutive_hits: _Optional[int] = ...) -> None: ...

class MagCacheConfig(_message.Message):
    __slots__ = ("threshold", "max_consecutive_hits", "retention_fraction")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_CONSECUTIVE_HITS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    max_consecutive_hits: int
    retention_fraction: float
    def __init__(self, threshold: _Optional[float] = ..., max_consecutive_hits: _Optional[int] = ..., retention_fraction: _Optional[float] = ...) -> None: ...

class MeanCacheConfig(_message.Message):
    __slots__ = ("fresh_fraction", "warmup_steps", "final_steps")
    FRESH_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    fresh_fraction: float
    warmup_steps: int
    final_steps: int
    def __init__(self, fresh_fraction: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., final_steps: _Optional[int] = ...) -> None: ...

class TaylorSeerConfig(_message.Message):
    __slots__ = ("interval", "order", "warmup_steps", "front_blocks", "back_blocks")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    FRONT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BACK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    interval: int
    order: int
    warmup_steps: int
    front_blocks: int
    back_blocks: int
    def __init__(self, interval: _Optional[int] = ..., order: _Optional[int] = ..., warmup_steps: _Optional[int] = ..., front_blocks: _Optional[int] = ..., back_blocks: _Optional[int] = ...) -> None: ...

class BlockDanceConfig(_message.Message):
    __slots__ = ("interval", "reuse_fraction", "start_fraction", "end_fraction")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    REUSE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    START_FRACTION_FIELD_NUMBER: _ClassVar[int]
    END_FRACTION_FIELD_NUMBER: _ClassVar[int]
    interval: int
    reuse_fraction: float
    start_fraction: float
    end_fraction: float
    def __init__(self, interval: _Optional[int] = ..., reuse_fraction: _Optional[float] = ..., start_fraction: _Optional[float] = ..., end_fraction: _Optional[float] = ...) -> None: ...

class DBCacheConfig(_message.Message):
    __slots__ = ("threshold", "front_blocks", "back_blocks", "warmup_steps", "max_consecutive_hits")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FRONT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BACK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONSECUTIVE_HITS_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    front_blocks: int
    back_blocks: int
    warmup_steps: int
    max_consecutive_hits: int
    def __init__(self, threshold: _Optional[float] = ..., front_blocks: _Optional[int] = ..., back_blocks: _Optional[int] = ..., warmup_steps: _Optional[int] = ..., max_consecutive_hits: _Optional[int] = ...) -> None: ...

class PABConfig(_message.Message):
    __slots__ = ("interval", "start_fraction", "end_fraction")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    START_FRACTION_FIELD_NUMBER: _ClassVar[int]
    END_FRACTION_FIELD_NUMBER: _ClassVar[int]
    interval: int
    start_fraction: float
    end_fraction: float
    def __init__(self, interval: _Optional[int] = ..., start_fraction: _Optional[float] = ..., end_fraction: _Optional[float] = ...) -> None: ...
