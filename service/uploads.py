"""Image uploads: the request body of /classify and /detect, parsed without FastAPI's form machinery.

Two ways to send an image, both answered the same way:

* `multipart/form-data` with the file in the field `image` and options as further fields
  (what browsers, `curl -F` and most HTTP clients send);
* the raw image as the whole body with `Content-Type: image/*` or `application/octet-stream`,
  options in the query string (`curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg'`).

Why not FastAPI's `File()`/`Form()` parameters: for a 70 kB photo they cost about half a
millisecond of event-loop time per request (python-multipart's byte-by-byte state machine, a
spooled temporary file, dependency solving), which on a 2-core box is a tenth of the whole
request. A form body is already in memory (the body size limit caps it), so finding the
boundaries with `bytes.find` is enough. Every malformed body is a 400 naming the problem.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from models.errors import InvalidInput

MAX_PARTS = 32
MAX_PART_HEADER_BYTES = 16 * 1024
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")

_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_BOUNDARY_OK = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def parse_header_value(value: str) -> tuple[str, dict[str, str]]:
    """`multipart/form-data; boundary="x"` -> ("multipart/form-data", {"boundary": "x"})."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(";" + rest):
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(key.lower(), raw)
    return main.strip().lower(), params


def _decode_header_block(block: bytes) -> list[tuple[str, str]]:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("latin-1")
    headers = []
    for line in text.split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise InvalidInput(f"malformed multipart body: bad part header line {line[:80]!r}")
        headers.append((name.strip().lower(), value.strip()))
    return headers


def parse_multipart(body: bytes, boundary: str) -> dict[str, Part]:
    """Split an in-memory multipart/form-data body into its parts, by field name."""
    if not _BOUNDARY_OK.match(boundary):
        raise InvalidInput("malformed multipart body: the boundary in Content-Type is missing or invalid")
    delim = b"--" + boundary.encode("latin-1")
    next_delim = b"\r\n" + delim
    if body.startswith(delim):
        pos = len(delim)
    else:
        at = body.find(next_delim)  # a preamble before the first boundary is allowed
        if at < 0:
            raise InvalidInput("malformed multipart body: the boundary from Content-Type never appears")
        pos = at + len(next_delim)
    parts: dict[str, Part] = {}
    while True:
        if body.startswith(b"--", pos):  # the closing delimiter; anything after is epilogue
            return parts
        while body[pos : pos + 1] in (b" ", b"\t"):  # transport padding (RFC 2046)
            pos += 1
        if not body.startswith(b"\r\n", pos):
            raise InvalidInput("malformed multipart body: expected a line break after a boundary")
        pos += 2
        if body.startswith(b"\r\n", pos):  # a part with no headers
            block, content_start = b"", pos + 2
        else:
            end = body.find(b"\r\n\r\n", pos, pos + MAX_PART_HEADER_BYTES + 4)
            if end < 0:
                raise InvalidInput("malformed multipart body: a part's headers never end (or exceed 16 kB)")
            block, content_start = body[pos:end], end + 4
        content_end = body.find(next_delim, content_start)
        if content_end < 0:
            raise InvalidInput("malformed multipart body: truncated (the closing boundary is missing)")
        part = _make_part(_decode_header_block(block), body[content_start:content_end])
        if part.name in parts:
            raise InvalidInput(f"form field {part.name!r} is given more than once")
        if len(parts) >= MAX_PARTS:
            raise InvalidInput(f"multipart body has more than {MAX_PARTS} parts")
        parts[part.name] = part
        pos = content_end + len(next_delim)


def _make_part(headers: list[tuple[str, str]], data: bytes) -> Part:
    disposition = next((v for k, v in headers if k == "content-disposition"), None)
    if disposition is None:
        raise InvalidInput("malformed multipart body: a part has no Content-Disposition header")
    kind, params = parse_header_value(disposition)
    name = params.get("name")
    if kind != "form-data" or not name:
        raise InvalidInput("malformed multipart body: a part is not `form-data` with a name")
    ctype = next((v for k, v in headers if k == "content-type"), None)
    return Part(name=name, data=data, filename=params.get("filename"), content_type=ctype)


# ---- options: typed, bounded, with the same messages whether they come as fields or query ----


def int_option(lo: int, hi: int) -> Callable[[str, str], int]:
    def conv(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise InvalidInput(f"invalid request: {name}: must be an integer, got {raw[:40]!r}") from None
        if not lo <= value <= hi:
            raise InvalidInput(f"invalid request: {name}: must be between {lo} and {hi}, got {value}")
        return value

    return conv


def float_option(lo: float, hi: float) -> Callable[[str, str], float]:
    def conv(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise InvalidInput(f"invalid request: {name}: must be a number, got {raw[:40]!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise InvalidInput(f"invalid request: {name}: must be between {lo:g} and {hi:g}, got {raw[:40]!r}")
        return value

    return conv


def str_option(max_length: int) -> Callable[[str, str], str]:
    def conv(name: str, raw: str) -> str:
        if len(raw) > max_length:
            raise InvalidInput(f"invalid request: {name}: at most {max_length} characters, got {len(raw)}")
        return raw

    return conv


Options = Mapping[str, Callable[[str, str], Any]]


# The options of each image route, shared by graft's routes (service/app.py) and BentoML's API
# (service/bento_api.py): one definition of their names and limits.
CLASSIFY_OPTIONS = {
    "top_k": int_option(1, 1000),
    "model": str_option(64),
}
DETECT_OPTIONS = {
    "score_threshold": float_option(0.0, 1.0),
    "max_detections": int_option(1, 1000),
    "model": str_option(64),
}


def _text(part: Part) -> str:
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"invalid request: {part.name}: not UTF-8 text") from None


def _json_field(name: str, text: str) -> str | None:
    """A form field as BentoML's client sends it (JSON: `5`, `0.4`, `"name"`, `null`), as the text the
    option's converter reads; None for null (the default applies)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text  # a plain text field, as curl -F sends it
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidInput(f"invalid request: {name}: expected a number or a string, got {text[:40]!r}")
    return value if isinstance(value, str) else repr(value)


def read_image_upload(
    body: bytes, content_type: str | None, query: Mapping[str, str], options: Options, *, json_fields: bool = False
) -> tuple[bytes, dict[str, Any]]:
    """The image bytes and the parsed options of one upload (see the module docstring).

    `json_fields`: form fields hold JSON values, as BentoML's client sends them (service/bento_api.py).
    """
    media, params = parse_header_value(content_type or "")
    raw: dict[str, str] = {k: query[k] for k in options if k in query}
    if media == "multipart/form-data":
        parts = parse_multipart(body, params.get("boundary", ""))
        image = parts.get("image")
        if image is None:
            raise InvalidInput("invalid request: image: the form has no `image` file field")
        for key in options:
            if key in parts:
                text = _text(parts[key])
                value = _json_field(key, text) if json_fields else text
                if value is not None:
                    raw[key] = value
        data = image.data
    elif media.startswith(RAW_IMAGE_TYPES):
        data = body
    else:
        shown = media or "none"
        raise InvalidInput(
            f"invalid request: image: send it as multipart/form-data (field `image`) or as the raw body "
            f"with Content-Type image/* or application/octet-stream, not {shown[:60]}",
        )
    return data, {key: options[key](key, value) for key, value in raw.items()}


def image_upload_openapi(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The OpenAPI requestBody and query parameters of an image route, for /docs.json."""
    image = {
        "type": "string",
        "format": "binary",
        "description": "the image: JPEG, PNG, WebP, BMP or GIF (first frame)",
    }
    return {
        "parameters": [
            {"name": k, "in": "query", "required": False, "schema": v, "description": v.get("description", "")}
            for k, v in fields.items()
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": image, **fields},
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "multipart form with the `image` file (options as fields), or the raw image "
            "as the body (Content-Type image/* or application/octet-stream; options in the query string)",
        },
    }
