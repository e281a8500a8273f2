from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[Tensor.DType]
        DTYPE_FLOAT32: _ClassVar[Tensor.DType]
        DTYPE_BFLOAT16: _ClassVar[Tensor.DType]
        DTYPE_INT64: _ClassVar[Tensor.DType]
    DTYPE_UNSPECIFIED: Tensor.DType
    DTYPE_FLOAT32: Tensor.DType
    DTYPE_BFLOAT16: Tensor.DType
    DTYPE_INT64: Tensor.DType
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Tensor.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Tensor.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Extend(_message.Message):
    __slots__ = ("seq_id", "token_ids", "want_all", "features_tokens")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    WANT_ALL_FIELD_NUMBER: _ClassVar[int]
    FEATURES_TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    want_all: bool
    features_tokens: int
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., want_all: _Optional[bool] = ..., features_tokens: _Optional[int] = ...) -> None: ...

class Truncate(_message.Message):
    __slots__ = ("seq_id", "length_tokens")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    length_tokens: int
    def __init__(self, seq_id: _Optional[str] = ..., length_tokens: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "extends", "truncates", "releases", "logits_dtype", "shared_memory")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    EXTENDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATES_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    LOGITS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    extends: _containers.RepeatedCompositeFieldContainer[Extend]
    truncates: _containers.RepeatedCompositeFieldContainer[Truncate]
    releases: _containers.RepeatedScalarFieldContainer[str]
    logits_dtype: Tensor.DType
    shared_memory: bool
    def __init__(self, step_id: _Optional[int] = ..., extends: _Optional[_Iterable[_Union[Extend, _Mapping]]] = ..., truncates: _Optional[_Iterable[_Union[Truncate, _Mapping]]] = ..., releases: _Optional[_Iterable[str]] = ..., logits_dtype: _Optional[_Union[Tensor.DType, str]] = ..., shared_memory: _Optional[bool] = ...) -> None: ...

class StepLogits(_message.Message):
    __slots__ = ("logits", "rows_per_extend", "features", "shared_memory_path")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_EXTEND_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_PATH_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    rows_per_extend: _containers.RepeatedScalarFieldContainer[int]
    features: Tensor
    shared_memory_path: str
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., rows_per_extend: _Optional[_Iterable[int]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., shared_memory_path: _Optional[str] = ...) -> None: ...

class SequenceLength(_message.Message):
    __slots__ = ("seq_id", "length_tokens")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    length_tokens: int
    def __init__(self, seq_id: _Optional[str] = ..., length_tokens: _Optional[int] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("code", "message", "sequences_changed")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[StepError.Code]
        CODE_INVALID_ARGUMENT: _ClassVar[StepError.Code]
        CODE_RESOURCE_EXHAUSTED: _ClassVar[StepError.Code]
        CODE_INTERNAL: _ClassVar[StepError.Code]
        CODE_UNAVAILABLE: _ClassVar[StepError.Code]
    CODE_UNSPECIFIED: StepError.Code
    CODE_INVALID_ARGUMENT: StepError.Code
    CODE_RESOURCE_EXHAUSTED: StepError.Code
    CODE_INTERNAL: StepError.Code
    CODE_UNAVAILABLE: StepError.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    code: StepError.Code
    message: str
    sequences_changed: bool
    def __init__(self, code: _Optional[_Union[StepError.Code, str]] = ..., message: _Optional[str] = ..., sequences_changed: _Optional[bool] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step_id", "logits", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    logits: StepLogits
    error: StepError
    def __init__(self, step_id: _Optional[int] = ..., logits: _Optional[_Union[StepLogits, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunnerInfo(_message.Message):
    __slots__ = ("name", "vocab_size", "vocab_fingerprint", "max_length_tokens", "dtype", "device", "num_parameters", "pid", "shm_dir", "shm_identity")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    SHM_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    vocab_size: int
    vocab_fingerprint: str
    max_length_tokens: int
    dtype: str
    device: str
    num_parameters: int
    pid: int
    shm_dir: str
    shm_identity: str
    def __init__(self, name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., vocab_fingerprint: _Optional[str] = ..., max_length_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., num_parameters: _Optional[int] = ..., pid: _Optional[int] = ..., shm_dir: _Optional[str] = ..., shm_identity: _Optional[str] = ...) -> None: ...

class SequencesRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class SequencesResponse(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceLength]
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceLength, _Mapping]]] = ...) -> None: ...
