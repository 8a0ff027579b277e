from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_CONTINUE: _ClassVar[Decision]
    DECISION_PROMOTE: _ClassVar[Decision]
    DECISION_ROLL_BACK: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_CONTINUE: Decision
DECISION_PROMOTE: Decision
DECISION_ROLL_BACK: Decision

class Variant(_message.Message):
    __slots__ = ("name", "base_url", "model", "adapter", "weight_buckets", "model_version", "arm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_url: str
    model: str
    adapter: str
    weight_buckets: int
    model_version: str
    arm: str
    def __init__(self, name: _Optional[str] = ..., base_url: _Optional[str] = ..., model: _Optional[str] = ..., adapter: _Optional[str] = ..., weight_buckets: _Optional[int] = ..., model_version: _Optional[str] = ..., arm: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("name", "variants", "experiment_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    experiment_id: str
    def __init__(self, name: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., experiment_id: _Optional[str] = ...) -> None: ...

class RoutingTable(_message.Message):
    __slots__ = ("version", "routes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, version: _Optional[int] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class WatchRoutingTableRequest(_message.Message):
    __slots__ = ("known_version",)
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    known_version: int
    def __init__(self, known_version: _Optional[int] = ...) -> None: ...

class GetRoutingTableRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ArmStatistics(_message.Message):
    __slots__ = ("arm", "variant", "requests", "errors", "rated", "positive", "mean_latency_s", "units", "units_sampled")
    ARM_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    RATED_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    MEAN_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    UNITS_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    arm: str
    variant: str
    requests: int
    errors: int
    rated: int
    positive: int
    mean_latency_s: float
    units: int
    units_sampled: int
    def __init__(self, arm: _Optional[str] = ..., variant: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., rated: _Optional[int] = ..., positive: _Optional[int] = ..., mean_latency_s: _Optional[float] = ..., units: _Optional[int] = ..., units_sampled: _Optional[int] = ...) -> None: ...

class ExperimentVerdict(_message.Message):
    __slots__ = ("experiment_id", "route", "decision", "reason", "arms", "lift", "lift_low", "lift_high", "p_value", "srm_p_value", "computed_at")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    LIFT_FIELD_NUMBER: _ClassVar[int]
    LIFT_LOW_FIELD_NUMBER: _ClassVar[int]
    LIFT_HIGH_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SRM_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    route: str
    decision: Decision
    reason: str
    arms: _containers.RepeatedCompositeFieldContainer[ArmStatistics]
    lift: float
    lift_low: float
    lift_high: float
    p_value: float
    srm_p_value: float
    computed_at: float
    def __init__(self, experiment_id: _Optional[str] = ..., route: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[str] = ..., arms: _Optional[_Iterable[_Union[ArmStatistics, _Mapping]]] = ..., lift: _Optional[float] = ..., lift_low: _Optional[float] = ..., lift_high: _Optional[float] = ..., p_value: _Optional[float] = ..., srm_p_value: _Optional[float] = ..., computed_at: _Optional[float] = ...) -> None: ...

class VerdictAck(_message.Message):
    __slots__ = ("action", "routing_version")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    action: str
    routing_version: int
    def __init__(self, action: _Optional[str] = ..., routing_version: _Optional[int] = ...) -> None: ...

class ManualActionRequest(_message.Message):
    __slots__ = ("route", "reason")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    route: str
    reason: str
    def __init__(self, route: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
