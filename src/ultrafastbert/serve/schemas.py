"""Request bodies of the endpoints (pydantic models; FastAPI shows them at ``/docs``).

``input`` is a string or a non-empty list of strings everywhere (the OpenAI convention). Token
ids (OpenAI clients can send them) are refused: they would be ids of another tokenizer.
Unknown fields (``user``...) are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

_JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
               dict: "an object", list: "a list", str: "a string"}


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _ids(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _as_texts(value: Any) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"must be a string or a list of strings, not {_kind(value)}")
    if not value:
        raise ValueError("is an empty list: send at least one text")
    if _ids(value) or all(isinstance(v, list) and _ids(v) for v in value):
        raise ValueError("token ids are not accepted: send the texts themselves (ids of "
                         "another tokenizer mean nothing to this model)")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"item {i} is {_kind(item)}, not a string")
    return value


Texts = Annotated[list[str], BeforeValidator(_as_texts)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Texts = Field(description="a text or a list of texts")
    model: StrictStr | None = Field(None, description="the served model's id (optional)")


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings`` (OpenAI's shape)."""

    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, base64-encoded")
    dimensions: StrictInt | None = Field(None, description="must equal the model's width")


class ClassifyRequest(_Request):
    """``POST /v1/classify``: labels (or a regression value) for each text (and pair)."""

    pair: Texts | None = Field(None, description="second text of each pair, one per input")


class FillMaskRequest(_Request):
    """``POST /v1/fill-mask``: the ``top_k`` candidates for each ``<mask>`` (or ``[MASK]``)."""

    top_k: StrictInt = Field(5, ge=1, description="candidates per mask")
