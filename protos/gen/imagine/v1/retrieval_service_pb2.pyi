from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_MODE_UNSPECIFIED: _ClassVar[SearchMode]
    SEARCH_MODE_TEXT: _ClassVar[SearchMode]
    SEARCH_MODE_GENERATED: _ClassVar[SearchMode]
    SEARCH_MODE_FUSED: _ClassVar[SearchMode]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_ATTENTION: _ClassVar[Aggregation]
    AGGREGATION_MEAN: _ClassVar[Aggregation]
SEARCH_MODE_UNSPECIFIED: SearchMode
SEARCH_MODE_TEXT: SearchMode
SEARCH_MODE_GENERATED: SearchMode
SEARCH_MODE_FUSED: SearchMode
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_ATTENTION: Aggregation
AGGREGATION_MEAN: Aggregation

class SearchRequest(_message.Message):
    __slots__ = ("collection", "text", "image", "top_k", "filter", "mode", "path_weights", "num_generated", "steps", "guidance", "seed", "explain", "aggregation")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class PathWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PATH_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    text: str
    image: bytes
    top_k: int
    filter: _containers.ScalarMap[str, str]
    mode: SearchMode
    path_weights: _containers.ScalarMap[str, float]
    num_generated: int
    steps: int
    guidance: float
    seed: int
    explain: bool
    aggregation: Aggregation
    def __init__(self, collection: _Optional[str] = ..., text: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Mapping[str, str]] = ..., mode: _Optional[_Union[SearchMode, str]] = ..., path_weights: _Optional[_Mapping[str, float]] = ..., num_generated: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., explain: _Optional[bool] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "path_scores", "uri", "payload", "url")
    class PathScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PATH_SCORES_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    path_scores: _containers.ScalarMap[str, float]
    uri: str
    payload: _struct_pb2.Struct
    url: str
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., path_scores: _Optional[_Mapping[str, float]] = ..., uri: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., url: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "model_version", "timings_ms", "generated_images", "weights", "cache_hit", "query_caption")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    QUERY_CAPTION_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    model_version: str
    timings_ms: _containers.ScalarMap[str, float]
    generated_images: _containers.RepeatedScalarFieldContainer[bytes]
    weights: _containers.ScalarMap[str, float]
    cache_hit: bool
    query_caption: str
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., model_version: _Optional[str] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., generated_images: _Optional[_Iterable[bytes]] = ..., weights: _Optional[_Mapping[str, float]] = ..., cache_hit: _Optional[bool] = ..., query_caption: _Optional[str] = ...) -> None: ...
