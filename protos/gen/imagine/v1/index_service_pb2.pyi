from google.protobuf import struct_pb2 as _struct_pb2
from protos.gen.imagine.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnsureCollectionRequest(_message.Message):
    __slots__ = ("collection", "vectors", "model_version")
    class VectorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    vectors: _containers.ScalarMap[str, int]
    model_version: str
    def __init__(self, collection: _Optional[str] = ..., vectors: _Optional[_Mapping[str, int]] = ..., model_version: _Optional[str] = ...) -> None: ...

class EnsureCollectionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetEtagsRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetEtagsResponse(_message.Message):
    __slots__ = ("etags",)
    class EtagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ETAGS_FIELD_NUMBER: _ClassVar[int]
    etags: _containers.ScalarMap[str, str]
    def __init__(self, etags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("id", "vectors", "payload")
    class VectorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Vector
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    vectors: _containers.MessageMap[str, _common_pb2.Vector]
    payload: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., vectors: _Optional[_Mapping[str, _common_pb2.Vector]] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class UpsertPointsRequest(_message.Message):
    __slots__ = ("collection", "points")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    points: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, collection: _Optional[str] = ..., points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class UpsertPointsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSourcePointsRequest(_message.Message):
    __slots__ = ("collection", "source", "page_token", "page_size")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    source: str
    page_token: str
    page_size: int
    def __init__(self, collection: _Optional[str] = ..., source: _Optional[str] = ..., page_token: _Optional[str] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListSourcePointsResponse(_message.Message):
    __slots__ = ("ids", "next_page_token")
    IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    next_page_token: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeletePointsRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeletePointsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
