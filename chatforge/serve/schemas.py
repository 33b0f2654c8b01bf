"""Request bodies of the OpenAI-compatible endpoints, validated strictly.

Types are strict (``"5"`` is not an integer, ``1`` is not a boolean) and unknown fields are rejected, as
OpenAI does, so a typo or an unsupported option (``response_format``) is a 400 that names it rather than a
setting silently ignored. ``null`` means "the default" for every optional field. Fields
marked *chatforge* are extensions a client passes through ``extra_body``.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from chatforge.infer.params import MAX_TOP_LOGPROBS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str = Field(description="the arguments as a JSON object in a string")


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="'developer' is OpenAI's newer name for 'system'")
    content: str | list[TextPart] | None = Field(None, validate_default=True,
                                                 description="text, or a list of text parts (joined)")
    name: str | None = None
    tool_call_id: str | None = None
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
    """Decoding settings shared by chat and text completions."""

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings, cut from the text")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (default: what fits)")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=0, description="chatforge: sample among the k most likely tokens (0 = off)")
    min_p: float | None = Field(None, ge=0, le=1, description="chatforge: min-p filtering (0 = off)")
    repetition_penalty: float | None = Field(None, gt=0, description="chatforge: CTRL repetition penalty")
    min_tokens: int | None = Field(None, ge=0, description="chatforge: suppress stop tokens before this many")
    ignore_eos: bool | None = Field(None, description="chatforge: do not stop at end-of-turn / end-of-text")
    truncate: bool | None = Field(None, description="chatforge: drop the oldest turns (chat) or tokens (text) "
                                                    "when the prompt does not fit, instead of a 400")


class FunctionSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(None, description="JSON schema of the arguments")
    strict: bool | None = None


class ToolSpec(Strict):
    type: Literal["function"]
    function: FunctionSpec


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = Field(None, description="functions the model may call; the client runs them")
    tool_choice: Literal["none", "auto"] | None = Field(None, description="'none' forbids calls; 'auto' (default) lets "
                                                                         "the model decide")
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, texts, token ids, or lists of token ids")
    suffix: str | None = Field(None, description="text after the insertion (models trained for fill-in-the-middle)")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)


class EditRequest(SamplingFields):
    """OpenAI's legacy /v1/edits: rewrite ``input`` as ``instruction`` says (answered by the chat model)."""

    input: str = Field("", description="the text to edit")
    instruction: str = Field(min_length=1, description="how to edit it, e.g. 'Fix the spelling mistakes.'")


class ModerationRequest(Strict):
    input: str | list[str]
    model: str | None = None


class EmbeddingRequest(Strict):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    input_type: Literal["query", "document"] | None = Field(
        "document", description="chatforge: which side of a search model the texts are on")
