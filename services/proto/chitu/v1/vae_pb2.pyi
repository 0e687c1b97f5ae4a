from services.proto.chitu.v1 import common_pb2 as _common_pb2
from services.proto.chitu.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_FORMAT_UNSPECIFIED: _ClassVar[MediaFormat]
    MEDIA_FORMAT_PNG: _ClassVar[MediaFormat]
    MEDIA_FORMAT_MP4: _ClassVar[MediaFormat]
    MEDIA_FORMAT_RAW_RGB8: _ClassVar[MediaFormat]
MEDIA_FORMAT_UNSPECIFIED: MediaFormat
MEDIA_FORMAT_PNG: MediaFormat
MEDIA_FORMAT_MP4: MediaFormat
MEDIA_FORMAT_RAW_RGB8: MediaFormat

class DecodeHeader(_message.Message):
    __slots__ = ("request_id", "model", "width", "height", "frames", "formats", "fps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    width: int
    height: int
    frames: int
    formats: _containers.RepeatedScalarFieldContainer[MediaFormat]
    fps: float
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., formats: _Optional[_Iterable[_Union[MediaFormat, str]]] = ..., fps: _Optional[float] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("header", "latents_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LATENTS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DecodeHeader
    latents_chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[DecodeHeader, _Mapping]] = ..., latents_chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("name", "format", "mime_type", "data", "width", "height", "frames", "fps", "frame_index")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: MediaFormat
    mime_type: str
    data: bytes
    width: int
    height: int
    frames: int
    fps: float
    frame_index: int
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[MediaFormat, str]] = ..., mime_type: _Optional[str] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., fps: _Optional[float] = ..., frame_index: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("artifacts", "decode_seconds", "encode_seconds", "tiled")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TILED_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    decode_seconds: float
    encode_seconds: float
    tiled: bool
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., decode_seconds: _Optional[float] = ..., encode_seconds: _Optional[float] = ..., tiled: _Optional[bool] = ...) -> None: ...

class GetVaeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetVaeInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.StageModelInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.StageModelInfo, _Mapping]] = ...) -> None: ...
