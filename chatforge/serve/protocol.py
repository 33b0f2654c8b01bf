"""Every request and response body of the server, in one place (pydantic models; ``/openapi.json`` is built
from them).

Types are strict (``"5"`` is not an integer, ``1`` is not a boolean) and unknown fields are rejected, as
OpenAI does, so a typo or an unsupported option (``response_format``) is a 400 that names it rather than a
setting silently ignored. ``null`` means "the default" for every optional field. Fields marked *chatforge*
are extensions a client passes through ``extra_body``. Numeric sampling settings take their ranges from
``chatforge.infer.params.BOUNDS``, the engine's own check, so the schema and the engine cannot disagree.
Text is refused where it holds NUL characters or lone surrogates (no tokenizer, database or log takes them).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from chatforge.data.rankings import MAX_K
from chatforge.infer.params import BOUNDS, MAX_INT32, MAX_TOP_LOGPROBS

MAX_NAME = 200  # model ids, user ids and names: the database's String(200) columns
MAX_ID = 64  # conversation, message and completion ids


def _clean_text(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("invalid_text", "NUL characters are not allowed in text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates survive JSON parsing but no tokenizer can encode them
        raise PydanticCustomError("invalid_text", "contains characters that are not valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_clean_text)]
Name = Annotated[str, Field(max_length=MAX_NAME), AfterValidator(_clean_text)]
Id = Annotated[str, Field(max_length=MAX_ID), AfterValidator(_clean_text)]
TokenIds = list[Annotated[int, Field(ge=0, le=MAX_INT32)]]  # the engine checks them against its vocabulary


def bounded(name: str, description: str | None = None) -> Any:
    """An optional sampling field with the engine's range for ``name``."""
    return Field(None, description=description, **BOUNDS[name].field_kwargs())


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- OpenAI requests --------------------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(Strict):
    name: Name
    arguments: Text = Field(description="the arguments as a JSON object in a string")


class ToolCall(Strict):
    id: Name
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="'developer' is OpenAI's newer name for 'system'")
    content: Text | list[TextPart] | None = Field(None, validate_default=True,
                                                  description="text, or a list of text parts (joined)")
    name: Name | None = None
    tool_call_id: Name | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant turn's calls of the request's tools")

    @field_validator("content", mode="after")
    @classmethod
    def content_unless_calling(cls, value, info: ValidationInfo):
        # only an assistant turn that calls tools may leave its content out, as in OpenAI's API
        if value is None and info.data.get("role") != "assistant":
            raise PydanticCustomError("missing", "Field required")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def calls(self) -> list[dict]:
        """The tool calls as the chat template takes them; ValueError names a call whose arguments are not JSON."""
        calls = []
        for call in self.tool_calls or []:
            arguments = json.loads(call.function.arguments or "{}")
            if not isinstance(arguments, dict):
                raise ValueError(f"tool call {call.id}: arguments must be a JSON object")
            calls.append({"name": call.function.name, "arguments": arguments})
        return calls

    def as_template(self) -> dict:
        """The message as the chat template takes it."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        return {**message, "tool_calls": self.calls()} if self.tool_calls else message


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """Decoding settings shared by chat and text completions and edits."""

    model: Name
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = bounded("n", "choices per prompt")
    stop: Text | list[Text] | None = Field(None, description="up to 4 stop strings, cut from the text")
    max_tokens: int | None = bounded("max_tokens", "most tokens to generate (default: what fits)")
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    presence_penalty: float | None = bounded("presence_penalty")
    frequency_penalty: float | None = bounded("frequency_penalty")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    seed: int | None = bounded("seed")
    user: Name | None = None
    top_k: int | None = bounded("top_k", "chatforge: sample among the k most likely tokens (0 = off)")
    min_p: float | None = bounded("min_p", "chatforge: min-p filtering (0 = off)")
    repetition_penalty: float | None = bounded("repetition_penalty", "chatforge: CTRL repetition penalty")
    min_tokens: int | None = bounded("min_tokens", "chatforge: suppress stop tokens before this many")
    ignore_eos: bool | None = Field(None, description="chatforge: do not stop at end-of-turn / end-of-text")
    truncate: bool | None = Field(None, description="chatforge: drop the oldest turns (chat) or tokens (text) "
                                                    "when the prompt does not fit, instead of a 400")


class FunctionSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict | None = Field(None, description="JSON schema of the arguments")
    strict: bool | None = None


class ToolSpec(Strict):
    type: Literal["function"]
    function: FunctionSpec


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = Field(None, description="functions the model may call; the client runs them")
    tool_choice: Literal["none", "auto"] | None = Field(None, description="'none' forbids calls; 'auto' (default) "
                                                                         "lets the model decide")
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = bounded("max_tokens", "newer name of max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        description="text, texts, token ids, or lists of token ids")
    suffix: Text | None = Field(None, description="text after the insertion (models trained for fill-in-the-middle)")
    echo: bool | None = False
    logprobs: int | None = bounded("logprobs")
    best_of: int | None = bounded("best_of")


class EditRequest(SamplingFields):
    """OpenAI's legacy /v1/edits: rewrite ``input`` as ``instruction`` says (answered by the chat model)."""

    input: Text = Field("", description="the text to edit")
    instruction: Text = Field(min_length=1, description="how to edit it, e.g. 'Fix the spelling mistakes.'")


class ModerationRequest(Strict):
    input: Text | list[Text]
    model: Name | None = None


class EmbeddingRequest(Strict):
    model: Name
    input: Text | list[Text] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: Name | None = None
    input_type: Literal["query", "document"] | None = Field(
        "document", description="chatforge: which side of a search model the texts are on")


# ---- feedback requests (the web page's store) -------------------------------------------------------------


class NewConversation(Strict):
    title: Text = Field("", max_length=1000)


class Rename(Strict):
    title: Text = Field(max_length=1000)


class NewMessage(Strict):
    """A question, or an answer: one the server generated (``completion_id`` and ``choice_index`` of its
    chat completion: the server fills in its text, model and finish reason), or one a person wrote
    (``content`` without a completion id: stored as human-written)."""

    conversation_id: Id
    role: Literal["system", "user", "assistant"]
    content: Text | None = None
    parent_id: Id | None = None
    completion_id: Id | None = Field(None, description="the chat completion's id, for an answer it generated")
    choice_index: int = Field(0, ge=0, le=BOUNDS["n"].high)
    compare_group: Id | None = None
    compare_index: int | None = Field(None, ge=0, le=MAX_K - 1)


class EditBody(Strict):
    content: Text


class RatingBody(Strict):
    value: Literal[-1, 0, 1]


class SignalBody(Strict):
    kind: Literal["copied"]


class RankingBody(Strict):
    message_ids: list[Id] = Field(min_length=2, max_length=MAX_K)
    ranking: list[Annotated[int, Field(ge=0, le=MAX_K - 1)]] = Field(max_length=MAX_K,
                                                                     description="indices into message_ids, best first")


# ---- responses --------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx and 5xx of this server has it."""

    error: ErrorDetail


def documented(model: type[BaseModel], stream: bool = False) -> dict:
    """``responses`` of a route: ``model`` as its 200 body (documentation the fuzz test holds the server to;
    the handlers build the bodies), plus server-sent events when it streams, plus the error shape."""
    ok: dict = {"model": model, "description": "the answer" + (" (or, with stream=true, server-sent events)"
                                                                 if stream else "")}
    if stream:
        ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    return {200: ok, **{status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 429, 499, 503, 504)}}


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int
    kind: Literal["chat", "embedding"]
    fim: bool


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict | None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    tool_runs: list[dict] | None = Field(None, description="chatforge: the server-side tool calls behind the answer")


class TextChoice(BaseModel):
    text: str
    index: int
    logprobs: dict | None
    finish_reason: str


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class EditChoice(BaseModel):
    index: int
    text: str
    finish_reason: str


class EditResponse(BaseModel):
    object: Literal["edit"]
    created: int
    model: str
    choices: list[EditChoice]
    usage: Usage


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    active: int
    waiting: int
    slots: int


class ConversationSummary(BaseModel):
    id: str
    title: str
    model: str
    created_at: str
    updated_at: str


class ConversationList(BaseModel):
    data: list[ConversationSummary]


class StoredMessage(BaseModel):
    id: str
    parent_id: str | None
    role: str
    content: str
    model: str | None
    finish_reason: str | None
    compare_group: str | None
    compare_index: int | None
    created_at: str
    rating: int
    author: Literal["model", "human", "unverified"]
    edited: bool
    signals: list[str]


class StoredRanking(BaseModel):
    id: str
    message_ids: list[str]
    ranking: list[int]
    created_at: str
    parent_id: str | None = None


class StoredConversation(ConversationSummary):
    messages: list[StoredMessage]
    rankings: list[StoredRanking]


class Deleted(BaseModel):
    deleted: str


class Recorded(BaseModel):
    recorded: str
