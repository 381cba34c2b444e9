"""The HTTP service's request and response bodies (pydantic), apart from the app so that the OpenAPI
schema and the validation rules are read in one place; the request bodies carry the app's limits."""

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

MAX_ID_CHARS = 256  # the longest item id (string) a request may carry
SESSION_ID = r"^[A-Za-z0-9._~:@-]{1,128}$"


def _item_id(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("an item id must be a string or an integer")
    if isinstance(value, str) and len(value) > MAX_ID_CHARS:
        raise ValueError(f"an item id has at most {MAX_ID_CHARS} characters")
    return value


ItemId = Annotated[Union[str, int], PlainValidator(_item_id),  # noqa: UP007 - pydantic reads this at runtime
                   WithJsonSchema({"anyOf": [{"type": "string", "maxLength": MAX_ID_CHARS}, {"type": "integer"}],
                                   "description": "an item id of the data file the run was trained on"})]


class RecommendationOut(BaseModel):
    item: Union[str, int] = Field(description="the data file's own item id")  # noqa: UP007
    score: float = Field(description="the model's score (a training-event count for the popularity fallback)")


class RecommendResponse(BaseModel):
    recommendations: list[list[RecommendationOut]] = Field(description="per history, the best items first")


class EventsResponse(BaseModel):
    session: str
    length: int = Field(description="events in the session so far")
    added: int = Field(description="events this request added")
    dropped: list[ItemId] = Field(description="unknown ids dropped (with unknown='drop')")


class SessionRecommendations(BaseModel):
    session: str
    length: int = Field(description="events in the session so far")
    recommendations: list[RecommendationOut] = Field(description="the best items first")


class Deleted(BaseModel):
    session: str
    deleted: bool


class Health(BaseModel):
    status: Literal["ok"]
    model: str = Field(description="the default model's (or, without one, the first's)")
    dataset: str
    items: int = Field(description="items the run knows (the largest k)")
    max_item_list_length: int = Field(description="L: the history length the model reads")
    streams: bool = Field(description="sessions keep a constant-size model state")
    sessions: int | None = Field(description="live sessions (null where Redis keeps them: not counted)")
    session_store: str = Field(description="memory, or the Redis URL (without its password)")
    models: list[str] = Field(description="the names of the models served (/models/NAME/...)")
    limits: dict[str, Union[int, float]]  # noqa: UP007


class ModelInfo(BaseModel):
    name: str
    model: str
    dataset: str
    run_dir: str | None
    items: int
    fingerprint: str = Field(description="the first 16 hex digits of the run's identity (weights and items)")
    loaded_at: float = Field(description="when this run was loaded (Unix time)")
    default: bool = Field(description="served at the root endpoints (/recommend, /sessions/...) too")


class ModelList(BaseModel):
    default: str | None
    models: list[ModelInfo]


class Reloaded(BaseModel):
    name: str
    previous: str = Field(description="the fingerprint of the run served before")
    model: ModelInfo


class FieldError(BaseModel):
    field: str
    msg: str
    type: str


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong, in one line")
    detail: list[FieldError] | None = Field(None, description="validation errors: one per field")


#: the error answers a POST endpoint documents (``responses=`` of its route)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "the body is not JSON"), (413, "the body is over the size limit"),
        (415, "the Content-Type header is not application/json"),
        (422, "a field, parameter or item id that cannot be used"))}


def request_models(limits: dict[str, Any], n_items: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request bodies, with this app's limits in their schema (and so in the OpenAPI docs)."""
    length = limits["max_history_length"]
    max_k = min(limits["max_k"], n_items)
    History = Annotated[list[ItemId], Field(max_length=length)]  # noqa: N806

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
            "examples": [{"histories": [["i1", "i2", "i3"]], "k": 10, "exclude_seen": False}]})
        histories: list[History] = Field(min_length=1, max_length=limits["max_histories"],
                                         description="histories of item ids, oldest first")
        k: int = Field(min(10, max_k), ge=1, le=max_k, description="items per history (default 10, or every "
                       "item the run knows if fewer)")
        exclude_seen: bool = Field(False, description="never recommend an item of the history")
        exclude: list[ItemId] = Field([], max_length=length, description="item ids never to recommend")
        unknown: Literal["error", "drop"] = Field(
            "error", description="an item id the run never saw: a 422 naming it, or dropped")
        fallback: Literal["popular"] | None = Field(
            None, description="answer an empty history with the most popular training items")

    class EventsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
            "examples": [{"items": ["i7"]}, {"items": ["i1", "i2"], "unknown": "drop"}]})
        items: list[ItemId] = Field(min_length=1, max_length=length, description="the new events, oldest first")
        unknown: Literal["error", "drop"] = Field(
            "error", description="an item id the run never saw: a 422 naming it, or dropped")

    return RecommendRequest, EventsRequest
