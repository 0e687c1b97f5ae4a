from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_ENCODE: _ClassVar[Stage]
    STAGE_DENOISE: _ClassVar[Stage]
    STAGE_DECODE: _ClassVar[Stage]

class GuidanceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUIDANCE_KIND_UNSPECIFIED: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_DISTILLED: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_CFG: _ClassVar[GuidanceKind]
    GUIDANCE_KIND_NONE: _ClassVar[GuidanceKind]
STAGE_UNSPECIFIED: Stage
STAGE_ENCODE: Stage
STAGE_DENOISE: Stage
STAGE_DECODE: Stage
GUIDANCE_KIND_UNSPECIFIED: GuidanceKind
GUIDANCE_KIND_DISTILLED: GuidanceKind
GUIDANCE_KIND_CFG: GuidanceKind
GUIDANCE_KIND_NONE: GuidanceKind

class ModelLimits(_message.Message):
    __slots__ = ("size_multiple", "min_size", "max_size", "max_prompt_tokens", "supports_video", "frame_multiple", "max_frames", "guidance_kind", "default_steps", "default_guidance_scale", "default_width", "default_height", "default_frames", "experts", "default_fps", "cfg_guidance_threshold", "cfg_needs_negative_prompt")
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_VIDEO_FIELD_NUMBER: _ClassVar[int]
    FRAME_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FPS_FIELD_NUMBER: _ClassVar[int]
    CFG_GUIDANCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CFG_NEEDS_NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    size_multiple: int
    min_size: int
    max_size: int
    max_prompt_tokens: int
    supports_video: bool
    frame_multiple: int
    max_frames: int
    guidance_kind: GuidanceKind
    default_steps: int
    default_guidance_scale: float
    default_width: int
    default_height: int
    default_frames: int
    experts: int
    default_fps: float
    cfg_guidance_threshold: float
    cfg_needs_negative_prompt: bool
    def __init__(self, size_multiple: _Optional[int] = ..., min_size: _Optional[int] = ..., max_size: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., supports_video: _Optional[bool] = ..., frame_multiple: _Optional[int] = ..., max_frames: _Optional[int] = ..., guidance_kind: _Optional[_Union[GuidanceKind, str]] = ..., default_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., default_frames: _Optional[int] = ..., experts: _Optional[int] = ..., default_fps: _Optional[float] = ..., cfg_guidance_threshold: _Optional[float] = ..., cfg_needs_negative_prompt: _Optional[bool] = ...) -> None: ...

class StageModelInfo(_message.Message):
    __slots__ = ("model", "family", "components", "checkpoint", "dtype", "device", "limits", "metadata", "aliases")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    model: str
    family: str
    components: _containers.RepeatedScalarFieldContainer[str]
    checkpoint: str
    dtype: str
    device: str
    limits: ModelLimits
    metadata: _containers.ScalarMap[str, str]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., family: _Optional[str] = ..., components: _Optional[_Iterable[str]] = ..., checkpoint: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., limits: _Optional[_Union[ModelLimits, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds", "endpoint")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    seconds: float
    endpoint: str
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., seconds: _Optional[float] = ..., endpoint: _Optional[str] = ...) -> None: ...
