from services.proto.chitu.v1 import common_pb2 as _common_pb2
from services.proto.chitu.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "negative_prompt", "encode_negative", "max_sequence_length")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    negative_prompt: str
    encode_negative: bool
    max_sequence_length: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., encode_negative: _Optional[bool] = ..., max_sequence_length: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("conditionings", "negative_conditionings", "warnings", "prompt_tokens")
    CONDITIONINGS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CONDITIONINGS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    conditionings: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    negative_conditionings: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    prompt_tokens: int
    def __init__(self, conditionings: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., negative_conditionings: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class GetEncoderInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetEncoderInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.StageModelInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.StageModelInfo, _Mapping]] = ...) -> None: ...
