from services.proto.chitu.v1 import cache_pb2 as _cache_pb2
from services.proto.chitu.v1 import common_pb2 as _common_pb2
from services.proto.chitu.v1 import vae_pb2 as _vae_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "negative_prompt", "width", "height", "frames", "steps", "guidance_scale", "seed", "output_formats", "guidance_scale_2", "fps", "cache")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_2_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    steps: int
    guidance_scale: float
    seed: int
    output_formats: _containers.RepeatedScalarFieldContainer[_vae_pb2.MediaFormat]
    guidance_scale_2: float
    fps: float
    cache: _cache_pb2.CachePolicy
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., output_formats: _Optional[_Iterable[_Union[_vae_pb2.MediaFormat, str]]] = ..., guidance_scale_2: _Optional[float] = ..., fps: _Optional[float] = ..., cache: _Optional[_Union[_cache_pb2.CachePolicy, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class StageStarted(_message.Message):
    __slots__ = ("stage", "endpoint")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    stage: _common_pb2.Stage
    endpoint: str
    def __init__(self, stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., endpoint: _Optional[str] = ...) -> None: ...

class StageFinished(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: _common_pb2.Stage
    seconds: float
    def __init__(self, stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("step", "total_steps", "step_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    step_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., step_seconds: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("stages", "step_seconds", "total_seconds", "queue_seconds")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[_common_pb2.StageTiming]
    step_seconds: _containers.RepeatedScalarFieldContainer[float]
    total_seconds: float
    queue_seconds: float
    def __init__(self, stages: _Optional[_Iterable[_Union[_common_pb2.StageTiming, _Mapping]]] = ..., step_seconds: _Optional[_Iterable[float]] = ..., total_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ...) -> None: ...

class GenerationResult(_message.Message):
    __slots__ = ("artifacts", "timings", "seed", "warnings", "width", "height", "frames", "steps", "guidance_scale", "metadata", "fps", "guidance_scale_2")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_2_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[_vae_pb2.Artifact]
    timings: Timings
    seed: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    width: int
    height: int
    frames: int
    steps: int
    guidance_scale: float
    metadata: _containers.ScalarMap[str, str]
    fps: float
    guidance_scale_2: float
    def __init__(self, artifacts: _Optional[_Iterable[_Union[_vae_pb2.Artifact, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., seed: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., fps: _Optional[float] = ..., guidance_scale_2: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "elapsed_seconds", "queued", "stage_started", "stage_finished", "step", "result")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STAGE_STARTED_FIELD_NUMBER: _ClassVar[int]
    STAGE_FINISHED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    elapsed_seconds: float
    queued: Queued
    stage_started: StageStarted
    stage_finished: StageFinished
    step: StepProgress
    result: GenerationResult
    def __init__(self, request_id: _Optional[str] = ..., elapsed_seconds: _Optional[float] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., stage_started: _Optional[_Union[StageStarted, _Mapping]] = ..., stage_finished: _Optional[_Union[StageFinished, _Mapping]] = ..., step: _Optional[_Union[StepProgress, _Mapping]] = ..., result: _Optional[_Union[GenerationResult, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageEndpoint(_message.Message):
    __slots__ = ("stage", "address", "serving", "info")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    stage: _common_pb2.Stage
    address: str
    serving: bool
    info: _common_pb2.StageModelInfo
    def __init__(self, stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., address: _Optional[str] = ..., serving: _Optional[bool] = ..., info: _Optional[_Union[_common_pb2.StageModelInfo, _Mapping]] = ...) -> None: ...

class ModelEntry(_message.Message):
    __slots__ = ("name", "family", "limits", "endpoints", "serving")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    limits: _common_pb2.ModelLimits
    endpoints: _containers.RepeatedCompositeFieldContainer[StageEndpoint]
    serving: bool
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., limits: _Optional[_Union[_common_pb2.ModelLimits, _Mapping]] = ..., endpoints: _Optional[_Iterable[_Union[StageEndpoint, _Mapping]]] = ..., serving: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelEntry]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelEntry, _Mapping]]] = ...) -> None: ...
