"""Request bodies (OpenAI's shapes plus this server's extras), validated strictly: a field of the
wrong type is a 400, unknown fields are ignored (clients send many optional ones)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Model):
    url: str
    detail: Optional[str] = None


class ContentPart(_Model):
    type: str
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class Message(_Model):
    role: str
    content: Optional[Union[str, list[ContentPart]]] = None
    images: Optional[list[Any]] = None  # an assistant reply's drawn images (this server's replies carry them)


class StreamOptions(_Model):
    include_usage: bool = False


MAX_SEED = 2**63 - 1


class ChatRequest(_Model):
    model: Optional[str] = None
    messages: list[Message]
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    # extras
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    # refused when set (not supported by this model/server)
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    logit_bias: Optional[dict[str, Any]] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    response_format: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[Any] = None


class ImageGenerationRequest(_Model):
    prompt: str
    model: Optional[str] = None
    n: int = Field(1, ge=1, le=10)
    size: Optional[str] = None
    response_format: Optional[Literal["b64_json", "url"]] = None
    output_format: Optional[str] = None
    stream: Optional[bool] = None
    # extras: upstream's sampling settings and the exact resolution
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    cfg: Optional[float] = None
    top_k: Optional[int] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    tau: Optional[float] = Field(None, gt=0.0)
    aspect: Optional[str] = None
    pn: Optional[str] = None


# the form fields of /v1/images/edits (multipart: every value arrives as a string)
EDIT_INT_FIELDS = {"n": (1, 10), "seed": (0, MAX_SEED), "top_k": (0, None)}
EDIT_FLOAT_FIELDS = {"cfg": None, "top_p": (0.0, 1.0), "tau": (0.0, None)}
EDIT_STR_FIELDS = ("prompt", "size", "response_format", "output_format", "aspect", "pn", "model", "stream")
