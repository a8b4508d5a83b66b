"""OpenAI request bodies (the fields this server honours), validated with pydantic.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send ``logprobs``, ``user``
and the like by default); fields we cannot honour with their non-default
values (``n`` > 1, ``echo``, ``logprobs``) are refused, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from typing_extensions import Annotated


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: Optional[str] = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Body):
    data: str = Field(description="base64 WAV, 16 kHz mono 16-bit")
    format: Literal["wav"] = "wav"

    @field_validator("format", mode="before")
    @classmethod
    def _wav_only(cls, value):
        if value != "wav":
            raise ValueError(f"audio format {value!r} is not supported; send 'wav' (16 kHz mono 16-bit PCM)")
        return value


class AudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


#: Tags of the unions below, in angle brackets so that they are told apart from fields (pydantic
#: puts the tag of the branch it took in an error's location; :data:`BRANCH_TAG` strips it).
BRANCH_TAG = "<"
PART_TYPES = ("text", "image_url", "input_audio")


def _part_type(value: Any) -> Optional[str]:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"<{kind}>" if kind in PART_TYPES else None


def _content_shape(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return "<string>"
    return "<parts>" if isinstance(value, list) else None


# A part is validated against the model its ``type`` names only (not against every model in turn,
# whose errors would name the wrong one).
ContentPart = Annotated[
    Union[Annotated[TextPart, Tag("<text>")], Annotated[ImagePart, Tag("<image_url>")],
          Annotated[AudioPart, Tag("<input_audio>")]],
    Discriminator(_part_type, custom_error_type="part_type",
                  custom_error_message="a content part needs a type of 'text', 'image_url' or 'input_audio'")]

Content = Annotated[
    Union[Annotated[Optional[str], Tag("<string>")], Annotated[List[ContentPart], Tag("<parts>")]],
    Discriminator(_content_shape, custom_error_type="content_type",
                  custom_error_message="content must be a string or a list of content parts")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    skip_special_tokens: bool = Field(True, description="vLLM's: <think>, <answer>, ... left out of the text")
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens whatever is sampled")
    logprobs: Optional[Any] = None
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return None


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    enable_thinking: Optional[bool] = None
    return_reasoning: bool = False
    thinking_budget: Optional[int] = Field(None, ge=0)
    chat_template_kwargs: Optional[Dict[str, Any]] = None

    def thinking(self) -> bool:
        """``enable_thinking`` at the top level (the deployment guide) or in ``chat_template_kwargs`` (vLLM)."""
        if self.enable_thinking is not None:
            return self.enable_thinking
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", False))


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]
    echo: bool = False
    max_tokens: Optional[int] = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request")
            value = value[0]
        if not value:
            raise ValueError("prompt must be a non-empty string")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not supported by this server")
        return value
