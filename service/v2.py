"""The KServe v2 / Open Inference Protocol under /v2, so Triton and KServe clients work as-is.

Inputs come either as the tensors the artifact declares (e.g. FP32 `input` [N,3,H,W], already
preprocessed) or as one BYTES tensor of encoded images or UTF-8 texts, which graft preprocesses
with the artifact's own rules. Both JSON tensors and Triton's binary tensor extension
(`Inference-Header-Content-Length`) are accepted and produced. Requesting an output with
`parameters: {"classification": k}` returns the top-k as "probability:index:label" strings.

The work a request causes is bounded like on the task routes: a large body is parsed on a decode
thread with its memory held in the worker's budget; each row of the batch (1 to MAX_V2_BATCH) goes
through the model's batcher as one item, so rows share the queue bound and are run at most
max_batch_size at a time; text models refuse sequences longer than the manifest's max_length and
token ids outside the vocabulary; a JSON answer is limited to MAX_JSON_VALUES numbers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from models.errors import InvalidInput
from models.postprocess import softmax

from .bodies import off_loop, parse_held
from .budget import MemoryBudget
from .deps import Pool
from .pool import ModelNotFound, ModelPool
from .served import ServedModel

V2_DTYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": None,
}
MANIFEST_TO_V2 = {
    "float32": "FP32",
    "float16": "FP16",
    "int64": "INT64",
    "int32": "INT32",
    "uint8": "UINT8",
    "bool": "BOOL",
}
MAX_V2_BATCH = 256
# Numbers in one JSON answer (a detector's rows hold 10,000s): beyond this, ask for binary_data.
MAX_JSON_VALUES = 1 << 21
# Peak bytes per number while rendering a JSON answer (a Python float, its list slot, its text).
_JSON_BYTES_PER_VALUE = 64


class TensorIn(BaseModel):
    name: str = Field(max_length=128)
    shape: list[Annotated[int, Field(ge=0, le=1 << 24)]] = Field(max_length=8)
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class OutputRequest(BaseModel):
    name: str = Field(max_length=128)
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = Field(default=None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[TensorIn] = Field(min_length=1, max_length=16)
    outputs: list[OutputRequest] | None = None


def _flatten(data: Any, rank: int, name: str) -> list[Any]:
    """Row-major values of a flat or nested JSON list, nested at most `rank` deep. Flattens one
    level at a time (a flat list, the usual case, is returned as is); values that are still lists
    are refused when numpy converts them."""
    if not isinstance(data, list):
        return [data]
    level, depth = data, 1
    while level and isinstance(level[0], list):
        if depth >= max(rank, 1):
            raise InvalidInput(f"input {name!r}: data is nested deeper than its {rank}-dimensional shape")
        level = [x for sub in level for x in (sub if isinstance(sub, list) else (sub,))]
        depth += 1
    return level


def _deserialize_bytes(raw: bytes) -> list[bytes]:
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidInput("BYTES binary data is truncated (a 4-byte length prefix is cut off)")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise InvalidInput("BYTES binary data is truncated (an element is shorter than its length prefix)")
        items.append(raw[i : i + n])
        i += n
    return items


def _serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _decode_tensor(t: TensorIn, binary: memoryview, offset: int) -> tuple[np.ndarray | list[bytes], int]:
    """One input tensor as an ndarray (or a list of bytes for BYTES); returns the new offset."""
    if t.datatype not in V2_DTYPES:
        raise InvalidInput(f"input {t.name!r}: unsupported datatype {t.datatype!r} (use one of {sorted(V2_DTYPES)})")
    count = math.prod(t.shape)  # exact: np.prod wraps around past 2**63 and a huge shape "fits" no data
    if count == 0:  # (numpy cannot even reshape nothing into [0, 2**24, 2**24, ...])
        raise InvalidInput(f"input {t.name!r}: shape {t.shape} holds no values; every dimension must be at least 1")
    size = (t.parameters or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"input {t.name!r}: binary_data_size {size!r} does not fit the request body")
        raw = bytes(binary[offset : offset + size])
        offset += size
        if t.datatype == "BYTES":
            values: list[Any] = _deserialize_bytes(raw)
        else:
            dtype = V2_DTYPES[t.datatype]
            assert dtype is not None
            if size != count * dtype.itemsize:
                raise InvalidInput(f"input {t.name!r}: {size} bytes do not hold shape {t.shape} of {t.datatype}")
            return _finite(t, np.frombuffer(raw, dtype=dtype).reshape(t.shape)), offset
    else:
        if t.data is None:
            raise InvalidInput(f"input {t.name!r}: no data and no binary_data_size")
        values = _flatten(t.data, len(t.shape), t.name)
    if len(values) != count:
        raise InvalidInput(f"input {t.name!r}: {len(values)} values do not fill shape {t.shape}")
    if t.datatype == "BYTES":
        out = []
        for v in values:
            if isinstance(v, bytes):
                out.append(v)
            elif isinstance(v, str):
                try:
                    out.append(v.encode("utf-8"))
                except UnicodeEncodeError as e:
                    raise InvalidInput(f"input {t.name!r}: a BYTES string holds an unpaired UTF-16 surrogate") from e
            else:
                raise InvalidInput(f"input {t.name!r}: BYTES elements must be strings")
        return out, offset
    dtype = V2_DTYPES[t.datatype]
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range floats become inf: refused below
            arr = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:  # also values that are lists, at any depth
        raise InvalidInput(f"input {t.name!r}: values are not {t.datatype}: {e}") from e
    return _finite(t, arr.reshape(t.shape)), offset


def _finite(t: TensorIn, arr: np.ndarray) -> np.ndarray:
    """Refuse NaN and infinity in float inputs: no model here means anything by them, and the
    NaN outputs they cause cannot travel back in JSON."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInput(f"input {t.name!r} holds NaN or infinite values (or numbers too large for {t.datatype})")
    return arr


def _maybe_base64(item: bytes) -> bytes:
    """Images in JSON BYTES tensors travel base64-encoded; raw bytes (binary extension) pass."""
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        return item


def _get_model(pool: ModelPool, name: str, version: str | None) -> ServedModel:
    state = next((m for m in pool.served() if m.name == name), None)
    if state is None:
        raise ModelNotFound(f"model {name!r} is not served (see GET /v2/models/{name}... or GET /models)")
    if version is not None and version != state.version:
        raise ModelNotFound(f"model {name!r} serves version {state.version}, not {version!r}")
    return state


def metadata(model: ServedModel) -> dict[str, Any]:
    def spec(t: Any) -> dict[str, Any]:
        return {
            "name": t.name,
            "datatype": MANIFEST_TO_V2[t.dtype],
            "shape": [d if isinstance(d, int) else -1 for d in t.shape],
        }

    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [spec(t) for t in model.manifest.inputs],
        "outputs": [spec(t) for t in model.manifest.outputs],
        "parameters": {"task": model.task, "labels": model.manifest.labels, "bytes_input": model.bytes_input_name},
    }


@dataclass
class Parsed:
    """An inference request with its input tensors decoded (arrays, or bytes for BYTES)."""

    request: InferRequest
    tensors: dict[str, np.ndarray | list[bytes]]


def parse_infer(body: bytes, header_length: str | None, budget: MemoryBudget | None) -> Parsed:
    """The request's JSON and its tensors, from the raw body (JSON, or Triton's binary framing)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError as e:
            raise InvalidInput("Inference-Header-Content-Length is not an integer") from e
        if not 0 < n <= len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {n} does not fit a {len(body)}-byte body")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")

    def decode(obj: Any) -> Parsed:
        try:
            req = InferRequest.model_validate(obj)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise InvalidInput(f"invalid inference request: {loc}: {first['msg']}") from e
        offset = 0
        tensors: dict[str, np.ndarray | list[bytes]] = {}
        for t in req.inputs:
            tensors[t.name], offset = _decode_tensor(t, binary, offset)
        return Parsed(req, tensors)

    return parse_held(head, decode, budget, what="the inference request")


def _rows_from_tensors(model: ServedModel, decoded: dict[str, np.ndarray | list[bytes]]) -> list[Any]:
    """Declared tensors checked against the manifest, then cut into the model's batcher items."""
    declared = {t.name: t for t in model.manifest.inputs}
    if set(decoded) != set(declared):
        raise InvalidInput(f"inputs {sorted(decoded)} do not match the model's {sorted(declared)}")
    tensors: dict[str, np.ndarray] = {}
    for name, arr in decoded.items():
        assert isinstance(arr, np.ndarray)
        spec = declared[name]
        if arr.dtype != np.dtype(spec.dtype):
            raise InvalidInput(f"input {name!r} must be {MANIFEST_TO_V2[spec.dtype]}, got {arr.dtype}")
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d != s for d, s in zip(spec.shape, arr.shape, strict=False)
        ):
            raise InvalidInput(f"input {name!r} has shape {list(arr.shape)}; the model takes {spec.shape}")
        if not arr.shape or not 1 <= arr.shape[0] <= MAX_V2_BATCH:
            raise InvalidInput(f"input {name!r}: a batch of {arr.shape[:1]}; send 1 to {MAX_V2_BATCH} rows")
        tensors[name] = np.ascontiguousarray(arr)
    return model.rows_from_tensors(tensors)


def _expected_json_values(model: ServedModel, req: InferRequest, rows: int) -> int:
    """Numbers the JSON part of the answer will hold, from the manifest's output shapes (outputs
    with an open dimension besides the batch count 0 here; `render` checks them again)."""
    shapes = {o.name: o.shape[1:] for o in model.manifest.outputs}
    wanted = req.outputs or [OutputRequest(name=n) for n in shapes]
    binary_all = bool((req.parameters or {}).get("binary_data_output", False))
    total = 0
    for o in wanted:
        params = o.parameters or {}
        dims = shapes.get(o.name)
        if dims is None or params.get("binary_data", binary_all):
            continue
        k = params.get("classification")
        if isinstance(k, int) and k > 0:
            total += rows * k
        elif all(isinstance(d, int) for d in dims):
            total += rows * math.prod(dims)  # type: ignore[arg-type]
    return total


def _bytes_rows(model: ServedModel, items: list[bytes]) -> list[Any]:
    """BYTES elements to batcher items (on a decode thread): images arrive base64 in JSON."""
    if model.bytes_input_name == "image":
        items = [_maybe_base64(i) for i in items]
    return model.rows_from_bytes(items)


def _check_json_size(values: int) -> None:
    if values > MAX_JSON_VALUES:
        raise InvalidInput(
            f"the answer would hold {values:,} numbers, more than {MAX_JSON_VALUES:,} in JSON; send fewer rows "
            'or ask for binary outputs ("parameters": {"binary_data_output": true})',
            status_code=413,
        )


def render(
    model: ServedModel, req: InferRequest, results: dict[str, np.ndarray], budget: MemoryBudget | None
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (JSON, or JSON plus binary outputs)."""
    wanted = req.outputs or [OutputRequest(name=n) for n in results]
    binary_all = bool((req.parameters or {}).get("binary_data_output", False))
    json_values = 0
    for o in wanted:
        if o.name not in results:
            raise InvalidInput(f"unknown output {o.name!r}; the model has {sorted(results)}")
        if not (o.parameters or {}).get("binary_data", binary_all):
            json_values += results[o.name].size
    _check_json_size(json_values)
    hold = budget.hold(json_values * _JSON_BYTES_PER_VALUE) if budget is not None else contextlib.nullcontext()
    with hold:
        outputs, chunks = [], []
        for o in wanted:
            arr = results[o.name]
            params = o.parameters or {}
            k = params.get("classification")
            if k is not None:
                if not isinstance(k, int) or k < 1:
                    raise InvalidInput("classification must be a positive integer")
                probs = softmax(arr.reshape(arr.shape[0], -1))
                k = min(k, probs.shape[1])
                top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
                labels = model.manifest.labels
                strings = [
                    f"{probs[r, c]:.6f}:{c}:{labels[c] if c < len(labels) else c}".encode()
                    for r in range(top.shape[0])
                    for c in top[r]
                ]
                entry: dict[str, Any] = {"name": o.name, "datatype": "BYTES", "shape": [top.shape[0], k]}
                payload_bytes, json_data = _serialize_bytes(strings), [s.decode() for s in strings]
            else:
                dt = MANIFEST_TO_V2.get(str(arr.dtype), "FP32")
                arr = arr.astype(np.float32) if dt == "FP32" and arr.dtype != np.float32 else arr
                entry = {"name": o.name, "datatype": dt, "shape": list(arr.shape)}
                payload_bytes, json_data = np.ascontiguousarray(arr).tobytes(), None
            if params.get("binary_data", binary_all):
                entry["parameters"] = {"binary_data_size": len(payload_bytes)}
                chunks.append(payload_bytes)
            else:
                if json_data is None and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise InvalidInput(
                        f"output {o.name!r} holds NaN or infinity for this input, which JSON cannot carry; "
                        'ask for it with "binary_data": true'
                    )
                entry["data"] = json_data if json_data is not None else arr.reshape(-1).tolist()
            outputs.append(entry)
        response = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
        if req.id is not None:
            response["id"] = req.id
        head = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)),
    }


async def infer(model: ServedModel, request: Request, pool: ModelPool) -> Response:
    body = await request.body()
    header_length = request.headers.get("inference-header-content-length")
    parsed = await off_loop(pool.cpu_executor, len(body), parse_infer, body, header_length, pool.budget)
    req, decoded = parsed.request, parsed.tensors
    del parsed, body

    byte_inputs = [t for t in req.inputs if t.datatype == "BYTES"]
    if byte_inputs:
        if len(req.inputs) != 1:
            raise InvalidInput("send either one BYTES input or the model's declared tensors, not both")
        items = decoded[byte_inputs[0].name]
        assert isinstance(items, list)
        if not items or len(items) > MAX_V2_BATCH:
            raise InvalidInput(f"a BYTES input needs 1 to {MAX_V2_BATCH} elements, got {len(items)}")
        _check_json_size(_expected_json_values(model, req, len(items)))  # before decoding anything
        rows = await asyncio.get_running_loop().run_in_executor(model.cpu_executor, _bytes_rows, model, items)
    else:
        rows = _rows_from_tensors(model, decoded)
        _check_json_size(_expected_json_values(model, req, len(rows)))  # before running anything
    del decoded

    results = await model.submit_all(rows)
    del rows
    outputs = {name: np.stack([r.outputs[name] for r in results]) for name in model.output_names}
    del results
    size = sum(a.size for a in outputs.values()) * 8
    content, headers = await off_loop(pool.cpu_executor, size, render, model, req, outputs, pool.budget)
    return Response(content, headers=headers, media_type=None)


router = APIRouter(prefix="/v2", tags=["kserve-v2"])


@router.get("")
async def server_metadata() -> dict[str, Any]:
    """Server metadata (Open Inference Protocol)."""
    return {"name": "graft", "version": "0.1.0", "extensions": ["binary_tensor_data", "classification"]}


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def server_ready(pool: Pool) -> JSONResponse:
    ready = pool.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/models/{name}")
async def model_metadata(name: str, pool: Pool) -> dict[str, Any]:
    return metadata(_get_model(pool, name, None))


@router.get("/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, pool: Pool) -> dict[str, Any]:
    return metadata(_get_model(pool, name, version))


@router.get("/models/{name}/ready")
async def model_ready(name: str, pool: Pool) -> dict[str, Any]:
    m = _get_model(pool, name, None)
    return {"name": m.name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, pool: Pool) -> dict[str, Any]:
    m = _get_model(pool, name, version)
    return {"name": m.name, "ready": True}


@router.post("/models/{name}/infer")
async def model_infer(name: str, request: Request, pool: Pool) -> Response:
    """Inference with JSON or binary tensors (Triton's binary tensor data extension)."""
    return await infer(_get_model(pool, name, None), request, pool)


@router.post("/models/{name}/versions/{version}/infer")
async def model_version_infer(name: str, version: str, request: Request, pool: Pool) -> Response:
    return await infer(_get_model(pool, name, version), request, pool)
