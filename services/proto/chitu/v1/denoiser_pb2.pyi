from services.proto.chitu.v1 import cache_pb2 as _cache_pb2
from services.proto.chitu.v1 import common_pb2 as _common_pb2
from services.proto.chitu.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("request_id", "model", "conditionings", "negative_conditionings", "width", "height", "frames", "steps", "guidance_scale", "seed", "start_step", "end_step", "initial_latents", "latent_chunk_bytes", "scheduler_state", "return_scheduler_state", "guidance_scale_2", "cache")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONDITIONINGS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CONDITIONINGS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LATENTS_FIELD_NUMBER: _ClassVar[int]
    LATENT_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_STATE_FIELD_NUMBER: _ClassVar[int]
    RETURN_SCHEDULER_STATE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_2_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    conditionings: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    negative_conditionings: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    width: int
    height: int
    frames: int
    steps: int
    guidance_scale: float
    seed: int
    start_step: int
    end_step: int
    initial_latents: _tensor_pb2.Tensor
    latent_chunk_bytes: int
    scheduler_state: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    return_scheduler_state: bool
    guidance_scale_2: float
    cache: _cache_pb2.CachePolicy
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., conditionings: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., negative_conditionings: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., start_step: _Optional[int] = ..., end_step: _Optional[int] = ..., initial_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., latent_chunk_bytes: _Optional[int] = ..., scheduler_state: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., return_scheduler_state: _Optional[bool] = ..., guidance_scale_2: _Optional[float] = ..., cache: _Optional[_Union[_cache_pb2.CachePolicy, _Mapping]] = ...) -> None: ...

class DenoiseProgress(_message.Message):
    __slots__ = ("step", "total_steps", "step_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    step_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., step_seconds: _Optional[float] = ...) -> None: ...

class DenoiseSummary(_message.Message):
    __slots__ = ("step_seconds", "total_seconds", "queue_seconds", "metadata", "end_step", "scheduler_state")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_STATE_FIELD_NUMBER: _ClassVar[int]
    step_seconds: _containers.RepeatedScalarFieldContainer[float]
    total_seconds: float
    queue_seconds: float
    metadata: _containers.ScalarMap[str, str]
    end_step: int
    scheduler_state: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    def __init__(self, step_seconds: _Optional[_Iterable[float]] = ..., total_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., end_step: _Optional[int] = ..., scheduler_state: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class DenoiseResponse(_message.Message):
    __slots__ = ("progress", "latents_chunk", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: DenoiseProgress
    latents_chunk: _tensor_pb2.TensorChunk
    summary: DenoiseSummary
    def __init__(self, progress: _Optional[_Union[DenoiseProgress, _Mapping]] = ..., latents_chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., summary: _Optional[_Union[DenoiseSummary, _Mapping]] = ...) -> None: ...

class GetDenoiserInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDenoiserInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.StageModelInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.StageModelInfo, _Mapping]] = ...) -> None: ...
