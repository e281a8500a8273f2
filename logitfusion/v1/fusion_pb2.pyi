from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class RecipeSelection(_message.Message):
    __slots__ = ("preset", "method", "solver", "experts", "alphas", "beta", "interp_lambda", "max_alpha", "model", "inner", "tau", "top_k", "min_similarity")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ALPHAS_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    INTERP_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    MAX_ALPHA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INNER_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    preset: str
    method: str
    solver: str
    experts: _containers.RepeatedScalarFieldContainer[str]
    alphas: _containers.RepeatedScalarFieldContainer[float]
    beta: float
    interp_lambda: float
    max_alpha: float
    model: str
    inner: str
    tau: float
    top_k: int
    min_similarity: float
    def __init__(self, preset: _Optional[str] = ..., method: _Optional[str] = ..., solver: _Optional[str] = ..., experts: _Optional[_Iterable[str]] = ..., alphas: _Optional[_Iterable[float]] = ..., beta: _Optional[float] = ..., interp_lambda: _Optional[float] = ..., max_alpha: _Optional[float] = ..., model: _Optional[str] = ..., inner: _Optional[str] = ..., tau: _Optional[float] = ..., top_k: _Optional[int] = ..., min_similarity: _Optional[float] = ...) -> None: ...

class SpeculativeOptions(_message.Message):
    __slots__ = ("draft_model", "num_draft_tokens", "adaptive")
    DRAFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    draft_model: str
    num_draft_tokens: int
    adaptive: bool
    def __init__(self, draft_model: _Optional[str] = ..., num_draft_tokens: _Optional[int] = ..., adaptive: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "max_new_tokens", "sampling", "recipe", "stop", "stop_at_eos", "speculative")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_EOS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: TokenIds
    max_new_tokens: int
    sampling: SamplingParams
    recipe: RecipeSelection
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_at_eos: bool
    speculative: SpeculativeOptions
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., recipe: _Optional[_Union[RecipeSelection, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., stop_at_eos: _Optional[bool] = ..., speculative: _Optional[_Union[SpeculativeOptions, _Mapping]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "index")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    index: int
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class ExpertWeight(_message.Message):
    __slots__ = ("expert", "weight")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    expert: str
    weight: float
    def __init__(self, expert: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class StepWeights(_message.Message):
    __slots__ = ("step", "experts", "loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertWeight]
    loss: float
    def __init__(self, step: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertWeight, _Mapping]]] = ..., loss: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "steps", "drafted_tokens", "accepted_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    steps: int
    drafted_tokens: int
    accepted_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason", "usage", "stop", "text")
    REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    usage: Usage
    stop: str
    text: str
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., stop: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "usage", "steps", "recipe")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: Usage
    steps: _containers.RepeatedCompositeFieldContainer[StepWeights]
    recipe: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[StepWeights, _Mapping]]] = ..., recipe: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "tokens", "weights", "finished")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    weights: StepWeights
    finished: Finished
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., weights: _Optional[_Union[StepWeights, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class ListRecipesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RecipeInfo(_message.Message):
    __slots__ = ("name", "method", "models", "experts", "solver", "alphas", "description", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    ALPHAS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    method: str
    models: _containers.RepeatedScalarFieldContainer[str]
    experts: _containers.RepeatedScalarFieldContainer[str]
    solver: str
    alphas: _containers.RepeatedScalarFieldContainer[float]
    description: str
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., method: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., experts: _Optional[_Iterable[str]] = ..., solver: _Optional[str] = ..., alphas: _Optional[_Iterable[float]] = ..., description: _Optional[str] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListRecipesResponse(_message.Message):
    __slots__ = ("recipes", "default_preset")
    RECIPES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRESET_FIELD_NUMBER: _ClassVar[int]
    recipes: _containers.RepeatedCompositeFieldContainer[RecipeInfo]
    default_preset: str
    def __init__(self, recipes: _Optional[_Iterable[_Union[RecipeInfo, _Mapping]]] = ..., default_preset: _Optional[str] = ...) -> None: ...

class DescribeDeploymentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "role", "vocab_size", "vocab_fingerprint", "max_length_tokens", "dtype", "device", "num_parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    vocab_size: int
    vocab_fingerprint: str
    max_length_tokens: int
    dtype: str
    device: str
    num_parameters: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., vocab_size: _Optional[int] = ..., vocab_fingerprint: _Optional[str] = ..., max_length_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., num_parameters: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_concurrent_requests", "max_batch_size", "max_new_tokens", "max_prompt_tokens", "max_message_bytes", "request_timeout_s", "max_stop_strings", "max_stop_string_chars", "default_max_new_tokens", "max_draft_tokens")
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRING_CHARS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_concurrent_requests: int
    max_batch_size: int
    max_new_tokens: int
    max_prompt_tokens: int
    max_message_bytes: int
    request_timeout_s: float
    max_stop_strings: int
    max_stop_string_chars: int
    default_max_new_tokens: int
    max_draft_tokens: int
    def __init__(self, max_concurrent_requests: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., request_timeout_s: _Optional[float] = ..., max_stop_strings: _Optional[int] = ..., max_stop_string_chars: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., max_draft_tokens: _Optional[int] = ...) -> None: ...

class DescribeDeploymentResponse(_message.Message):
    __slots__ = ("version", "models", "recipes", "default_preset", "limits", "vocab_size", "eos_token_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RECIPES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRESET_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    version: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    recipes: _containers.RepeatedCompositeFieldContainer[RecipeInfo]
    default_preset: str
    limits: Limits
    vocab_size: int
    eos_token_id: int
    def __init__(self, version: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., recipes: _Optional[_Iterable[_Union[RecipeInfo, _Mapping]]] = ..., default_preset: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., vocab_size: _Optional[int] = ..., eos_token_id: _Optional[int] = ...) -> None: ...
