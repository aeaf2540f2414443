from protos.gen.imagine.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodingStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECODING_STRATEGY_UNSPECIFIED: _ClassVar[DecodingStrategy]
    DECODING_STRATEGY_GREEDY: _ClassVar[DecodingStrategy]
    DECODING_STRATEGY_BEAM: _ClassVar[DecodingStrategy]
    DECODING_STRATEGY_SAMPLE: _ClassVar[DecodingStrategy]
DECODING_STRATEGY_UNSPECIFIED: DecodingStrategy
DECODING_STRATEGY_GREEDY: DecodingStrategy
DECODING_STRATEGY_BEAM: DecodingStrategy
DECODING_STRATEGY_SAMPLE: DecodingStrategy

class CaptionRequest(_message.Message):
    __slots__ = ("images", "strategy", "beam_size", "temperature", "seed")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    strategy: DecodingStrategy
    beam_size: int
    temperature: float
    seed: int
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., strategy: _Optional[_Union[DecodingStrategy, str]] = ..., beam_size: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Caption(_message.Message):
    __slots__ = ("text", "log_prob", "error")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    text: str
    log_prob: float
    error: str
    def __init__(self, text: _Optional[str] = ..., log_prob: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class CaptionResponse(_message.Message):
    __slots__ = ("captions", "model_version")
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    captions: _containers.RepeatedCompositeFieldContainer[Caption]
    model_version: str
    def __init__(self, captions: _Optional[_Iterable[_Union[Caption, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class EncodeTextRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EncodeTextResponse(_message.Message):
    __slots__ = ("embeddings", "model_version")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Vector]
    model_version: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[_common_pb2.Vector, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class EncodeImageRequest(_message.Message):
    __slots__ = ("images", "vector")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    vector: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., vector: _Optional[str] = ...) -> None: ...

class EncodeImageResponse(_message.Message):
    __slots__ = ("embeddings", "model_version", "errors")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Vector]
    model_version: str
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, embeddings: _Optional[_Iterable[_Union[_common_pb2.Vector, _Mapping]]] = ..., model_version: _Optional[str] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "num_images", "steps", "guidance", "seed")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    num_images: int
    steps: int
    guidance: float
    seed: int
    def __init__(self, prompt: _Optional[str] = ..., num_images: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    model_version: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., model_version: _Optional[str] = ...) -> None: ...
