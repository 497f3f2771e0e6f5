"""The request bodies `hetpipe serve` accepts, as pydantic models of OpenAI's API.

Every model forbids fields it does not name: a request that asks for something hetpipe does not do
(`tools`, `suffix`, image parts, ...) gets a 400 naming the field, never a silent default. Every
field is bounded (the README's table of limits): a value out of bounds is a 400 naming it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from ...core.sampling import MAX_LOGIT_BIAS, MAX_SEED, MAX_TOKEN_ID, PENALTY_RANGE

MAX_MESSAGES = 4096
MAX_PARTS = 256  # content parts of one message
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_PROMPTS = 64  # prompts of one /v1/completions request
MAX_CHOICES = 128  # prompts x n
MAX_N = 16
MAX_NAME = 256  # model names, user ids
TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")
Bool = StrictBool  # true or false only: "yes" or 1 is an error, not a guess


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


MAX_TOOLS = 128
FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # OpenAI's rule for function names


class FunctionCall(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(Strict):
    id: str = Field(max_length=MAX_NAME)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message that made tool calls
    content: str | Annotated[list[TextPart], Field(max_length=MAX_PARTS)] | None = None
    name: str | None = Field(default=None, max_length=MAX_NAME)  # a participant's name, given to the template
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # assistant: its calls
    tool_call_id: str | None = Field(default=None, max_length=MAX_NAME)  # tool: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: Bool = False
    continuous_usage_stats: Bool = False  # vLLM's: every chunk carries the usage so far


class JsonSchemaSpec(Strict):
    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    description: str | None = None
    strict: Bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKEN_ID)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class _Sampling(Strict):
    """What both endpoints share."""

    model: str | None = Field(default=None, max_length=MAX_NAME)  # left out: the served model (as llama.cpp, vLLM)
    max_tokens: TokenCount | None = None
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKEN_ID)  # vLLM's: no end token before this many
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Stop = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # below 1e-5: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=MAX_TOKEN_ID)  # beyond OpenAI, as vLLM takes it (0 or -1: off)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED - MAX_N)  # choice i samples with seed + i
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(default=None,
                                                                                       max_length=MAX_LOGIT_BIAS)
    ignore_eos: Bool = False  # beyond OpenAI (vLLM's name): benchmarks decode a fixed length
    user: str | None = Field(default=None, max_length=MAX_NAME)  # an end-user id for the caller's records

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"keys are token ids (decimal digits), not {key[:20]!r}")
        return bias


class Prediction(Strict):
    """OpenAI's Predicted Outputs: text the answer is expected to repeat, drafted from (speculative decoding)."""

    type: Literal["content"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_PARTS)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool = True
    max_completion_tokens: TokenCount | None = None
    logprobs: Bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    prediction: Prediction | None = None


class CompletionRequest(_Sampling):
    prompt: (str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | list[TokenId]
             | Annotated[list[list[TokenId]], Field(max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)] | None = None  # 0: the prompt only (with echo)
    echo: Bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None  # beyond OpenAI's completions, as vLLM takes it


class TokenizeRequest(Strict):
    """POST /tokenize, vLLM's shape: a `prompt`, or chat `messages` through the chat template."""

    model: str | None = Field(default=None, max_length=MAX_NAME)
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: Bool = True  # with messages
    add_special_tokens: Bool | None = None  # default: true for a prompt, false for messages (as vLLM)


class DetokenizeRequest(Strict):
    """POST /detokenize, vLLM's shape."""

    model: str | None = Field(default=None, max_length=MAX_NAME)
    tokens: list[TokenId]
