"""Strict parsing of request bodies: OAuth forms (RFC 6749 §3.1, §3.2) and the JSON
documents of the broker's own APIs.

Forms: only `application/x-www-form-urlencoded`; a parameter given twice is an error; a
parameter sent without a value counts as absent.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

from aiohttp import web
from pydantic import BaseModel, ValidationError

from broker.errors import InvalidRequest


def _pairs(text: str) -> list[tuple[str, str]]:
    """`parse_qsl(text, keep_blank_values=True, errors="strict")`, with the unquoting skipped
    for the pieces that have nothing to unquote (most OAuth parameters)."""
    pairs = []
    for piece in text.split("&"):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        if "%" in piece or "+" in piece:
            # One strict UTF-8 decode of the unquoted bytes: what `unquote(errors="strict")`
            # gives (the text came from valid UTF-8), without its run-by-run splitting.
            name = unquote_to_bytes(name.replace("+", " ")).decode("utf-8")
            value = unquote_to_bytes(value.replace("+", " ")).decode("utf-8")
        pairs.append((name, value))
    return pairs


def parse_form(body: bytes) -> dict[str, str]:
    try:
        pairs = _pairs(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the body is not a valid UTF-8 form") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise InvalidRequest(f"the parameter {key!r} is given more than once")
        if value != "":
            form[key] = value
        else:
            form.setdefault(key, "")
    return {k: v for k, v in form.items() if v != ""}


async def read_oauth_form(request: web.Request) -> dict[str, str]:
    """The request's form parameters; raises InvalidRequest for anything else."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("send the parameters as application/x-www-form-urlencoded")
    return parse_form(await request.read())


def query_params(request: web.Request) -> dict[str, str]:
    """Query parameters with the same rules as forms (for GET /oauth/authorize)."""
    return parse_form(request.query_string.encode())


async def read_json_object(request: web.Request, what: str) -> dict[str, Any]:
    """The body as a JSON object, or InvalidRequest naming `what` it should hold."""
    if request.content_type != "application/json":
        raise InvalidRequest(f"send {what} as an application/json document")
    try:
        document = json.loads(await request.read())
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest(f"the body must be a JSON object ({what})")
    return document


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_model(model: type[ModelT], document: Any, what: str = "the request") -> ModelT:
    """`document` validated as `model`, or InvalidRequest naming every problem by its field
    ("`what` is not valid: field: message; ...")."""
    try:
        return model.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
        )
        raise InvalidRequest(f"{what} is not valid: {problems}") from None
