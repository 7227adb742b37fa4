"""Send seeded, randomly mangled requests to a running graft server and check every answer.

    python -m scripts.fuzz --url http://127.0.0.1:3000 --requests 2000 --seed 1

Every endpoint gets hostile variants of a valid request: corrupted and truncated images, odd
form fields and content types, JSON of the wrong shape and type, lone surrogates, non-finite
numbers, JSON nested up to 10,000 deep, KServe v2 tensors with bad shapes, datatypes and binary
framing, open dimensions (batch, sequence) filled in the hundreds, token ids outside the
vocabulary, bad admin tokens. An
answer passes when it is a 2xx or a 4xx whose JSON body names the problem (`{"error": ...}`),
or a 503 with Retry-After; any other 5xx, a dropped connection or a server that is no longer
ready afterwards fails the run. Failing requests are printed with the seed and index that
reproduce them. Traffic goes only to the URL given; the run stops after --requests requests.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image


@dataclass
class Case:
    """One request: what it is, and the httpx arguments that send it."""

    kind: str
    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


MODES = {
    "PNG": ["RGB", "L", "RGBA", "P", "1", "I;16", "LA"],
    "JPEG": ["RGB", "L", "CMYK"],
    "GIF": ["RGB", "L", "P", "1"],
    "BMP": ["RGB", "L", "P", "1"],
    "WEBP": ["RGB", "RGBA", "L"],
}


def _image_bytes(rng: random.Random, fmt: str) -> bytes:
    w, h = rng.randint(1, 96), rng.randint(1, 96)
    mode = rng.choice(MODES[fmt])
    arr = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    grey16 = mode == "I;16"
    img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257) if grey16 else Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _mangle(rng: random.Random, data: bytes) -> bytes:
    """Bit flips, truncation, splices, or junk: the usual ways a file arrives broken."""
    how = rng.choice(["flip", "truncate", "splice", "junk", "empty", "header-only", "intact", "intact"])
    if how == "flip" and data:
        b = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if how == "truncate":
        return data[: rng.randrange(max(1, len(data)))]
    if how == "splice":
        i = rng.randrange(max(1, len(data)))
        return data[:i] + rng.randbytes(rng.randint(1, 64)) + data[i:]
    if how == "junk":
        return rng.randbytes(rng.randint(1, 4096))
    if how == "empty":
        return b""
    if how == "header-only":
        return data[:16]
    return data


def _odd_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            "",
            "0",
            "-1",
            "1e309",
            "nan",
            "inf",
            "3.5",
            "99999999999999999999999",
            "\x00",
            "\ud800",
            "true",
            "[1]",
            "🙂",
            " 5 ",
            "0x10",
            str(rng.randint(-5, 2000)),
            str(rng.random() * 2 - 0.5),
        ]
    )


def _image_case(rng: random.Random, route: str, models: dict[str, list[str]]) -> Case:
    fmt = rng.choice(["PNG", "JPEG", "GIF", "BMP", "WEBP"])
    body = _mangle(rng, _image_bytes(rng, fmt))
    fields = {"top_k": 3} if route == "/classify" else {"score_threshold": 0.3, "max_detections": 10}
    for name in list(fields):
        if rng.random() < 0.4:
            fields[name] = _odd_value(rng)
    if rng.random() < 0.15:
        fields["model"] = rng.choice([*models, "nope", "", "sentiment", "../etc", "🙂"])
    shape = rng.choice(["multipart", "multipart", "raw", "raw-octet", "wrong-type", "bad-multipart", "json"])
    if shape == "multipart":
        files = {
            "image": (rng.choice(["a.png", "", "x" * 300, "é.jpg"]), body, rng.choice(["image/png", "", "text/plain"]))
        }
        data = {k: str(v) for k, v in fields.items()}
        if rng.random() < 0.1:
            files["image2"] = ("b.png", body, "image/png")
        return Case(f"{route} multipart", "POST", route, {"files": files, "data": data})
    if shape in ("raw", "raw-octet"):
        ctype = (
            "application/octet-stream"
            if shape == "raw-octet"
            else rng.choice(["image/png", "image/jpeg", "image/x-odd", "image/"])
        )
        return Case(
            f"{route} raw", "POST", route, {"content": body, "headers": {"content-type": ctype}, "params": fields}
        )
    if shape == "wrong-type":
        ctype = rng.choice(
            ["text/plain", "application/json", "multipart/mixed", "", "application/x-www-form-urlencoded"]
        )
        return Case(f"{route} content-type", "POST", route, {"content": body, "headers": {"content-type": ctype}})
    if shape == "json":
        return Case(f"{route} json", "POST", route, {"json": {"image": base64.b64encode(body).decode()}})
    boundary = "b" * rng.randint(1, 70)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n'.encode() + body,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    raw = b"".join(parts)
    raw = raw[: rng.randrange(len(raw) + 1)] if rng.random() < 0.5 else raw.replace(b"\r\n", b"\n", rng.randint(1, 3))
    ctype = rng.choice(
        [f"multipart/form-data; boundary={boundary}", "multipart/form-data", "multipart/form-data; boundary="]
    )
    return Case(f"{route} broken multipart", "POST", route, {"content": raw, "headers": {"content-type": ctype}})


def _odd_json(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(10 if depth < 3 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 2**63, 1e308, -0.0, 3.25])
    if pick == 3:
        return "".join(
            rng.choice(["a", "é", "\x00", "\ud83d", "🙂", " ", "\n", "\u202e", "\ufeff"])
            for _ in range(rng.randint(0, 40))
        )
    if pick in (4, 5):
        return "tweet " * rng.randint(0, 20)
    if pick in (6, 7):
        return [_odd_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {str(_odd_json(rng, 3)): _odd_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _deep(rng: random.Random, inner: str = "1") -> str:
    """JSON nested tens to 10,000 levels deep (a list or object bomb)."""
    depth = rng.choice([30, 200, 900, 1100, 10_000])
    if rng.random() < 0.5:
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


def _sentiment_case(rng: random.Random, models: dict[str, list[str]]) -> Case:
    kind = rng.randrange(9)
    if kind == 8:
        raw = rng.choice(
            [_deep(rng), '{"texts": ' + _deep(rng, '"x"') + "}", '{"texts": ["a"], "model": ' + _deep(rng) + "}"]
        )
        return Case(
            "/sentiment deep json",
            "POST",
            "/sentiment",
            {"content": raw.encode(), "headers": {"content-type": "application/json"}},
        )
    if kind == 0:
        body: Any = {"texts": _odd_json(rng)}
    elif kind == 1:
        body = {
            "texts": [
                _odd_json(rng) if rng.random() < 0.3 else "ok " * rng.randint(0, 50) for _ in range(rng.randint(0, 80))
            ]
        }
    elif kind == 2:
        body = _odd_json(rng)
    elif kind == 3:
        body = {
            "texts": ["x" * rng.choice([1999, 2000, 2001, 50_000])],
            "model": rng.choice([None, 1, [], "sentiment", "classify", "sentiment@v0"]),
        }
    elif kind == 4:
        body = {"texts": ["fine"], **{_odd_value(rng): _odd_json(rng)}}
    elif kind == 5:
        raw = json.dumps({"texts": ["good", "bad"]}).encode()
        return Case(
            "/sentiment raw bytes",
            "POST",
            "/sentiment",
            {
                "content": _mangle(rng, raw),
                "headers": {
                    "content-type": rng.choice(["application/json", "text/plain", "application/json; charset=latin-1"])
                },
            },
        )
    elif kind == 6:
        # a lone surrogate or invalid UTF-8 straight in the body, not as a JSON escape
        raw = b'{"texts": ["a\xed\xa0\x80b", "\xff\xfe"]}'
        return Case(
            "/sentiment invalid utf-8",
            "POST",
            "/sentiment",
            {"content": raw, "headers": {"content-type": "application/json"}},
        )
    else:
        raw = ('{"texts": ["' + "\\ud800" * rng.randint(1, 3) + '", "fine"]}').encode()
        return Case(
            "/sentiment escaped surrogate",
            "POST",
            "/sentiment",
            {"content": raw, "headers": {"content-type": "application/json"}},
        )
    text = json.dumps(body, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    return Case(
        "/sentiment json",
        "POST",
        "/sentiment",
        {"content": text.encode("utf-8", "surrogatepass"), "headers": {"content-type": "application/json"}},
    )


V2_TYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16", "fp32", ""]


def _v2_case(rng: random.Random, models: dict[str, list[str]], meta: dict[str, Any]) -> Case:
    name = rng.choice([*models, "nope"])
    path = f"/v2/models/{name}/infer"
    if rng.random() < 0.1:
        path = f"/v2/models/{name}/versions/{rng.choice([*models.get(name, ['x']), '0', '..'])}/infer"
    spec = (meta.get(name) or {}).get("inputs") or [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
    inp = dict(spec[0])
    kind = rng.randrange(11)
    if kind == 9:  # deep nesting: the whole body, or one tensor's data
        raw = rng.choice(
            [
                _deep(rng),
                json.dumps(
                    {"inputs": [{"name": inp["name"], "datatype": inp["datatype"], "shape": [1], "data": "@"}]}
                ).replace('"@"', _deep(rng)),
                '{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":["a"]}],"parameters":' + _deep(rng) + "}",
            ]
        )
        return Case(
            "v2 deep json", "POST", path, {"content": raw.encode(), "headers": {"content-type": "application/json"}}
        )
    if kind == 10:  # open dimensions in the hundreds (a text model's batch and sequence)
        return _v2_open_dims_case(rng, path, spec)
    shape = [d if d > 0 else rng.choice([0, 1, 2]) for d in inp["shape"]]
    if kind == 0:  # declared tensor, values of the right count but hostile content
        n = int(np.prod(shape))
        if n > 200_000:
            shape, n = [1, *shape[1:]], int(np.prod([1, *shape[1:]]))
        vals = [
            rng.choice([0.0, 1e39, -1e39, float("nan"), float("inf"), 1.0, 3.4e38]) if rng.random() < 0.01 else 0.5
            for _ in range(n)
        ]
        body: Any = {"inputs": [{"name": inp["name"], "datatype": inp["datatype"], "shape": shape, "data": vals}]}
        text = json.dumps(body, allow_nan=True)
        return Case(
            "v2 hostile values",
            "POST",
            path,
            {"content": text.encode(), "headers": {"content-type": "application/json"}},
        )
    if kind == 1:  # wrong shapes and datatypes
        shape = [rng.choice([0, 1, 2, 3, 1 << 24, 7]) for _ in range(rng.randint(0, 9))]
        body = {
            "inputs": [
                {
                    "name": inp["name"],
                    "datatype": rng.choice(V2_TYPES),
                    "shape": shape,
                    "data": [1] * rng.randint(0, 12),
                }
            ]
        }
    elif kind == 2:  # BYTES with images or texts, mangled or base64
        items = [_mangle(rng, _image_bytes(rng, "PNG")) for _ in range(rng.randint(0, 3))]
        data = [rng.choice([base64.b64encode(i).decode(), i.decode("latin-1"), "\ud800", "hello", 5]) for i in items]
        body = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [len(data)], "data": data}]}
        text = json.dumps(body, ensure_ascii=True)
        return Case(
            "v2 bytes", "POST", path, {"content": text.encode(), "headers": {"content-type": "application/json"}}
        )
    elif kind == 3:  # binary tensor extension with lying lengths
        payload = rng.randbytes(rng.randint(0, 256))
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": inp["name"],
                        "datatype": rng.choice(V2_TYPES),
                        "shape": shape,
                        "parameters": {
                            "binary_data_size": rng.choice([len(payload), len(payload) + 1, -1, 0, "8", True, None])
                        },
                    }
                ]
            }
        ).encode()
        hlen = rng.choice([str(len(head)), str(len(head) + 5), "0", "-3", "abc", str(10**30)])
        return Case(
            "v2 binary", "POST", path, {"content": head + payload, "headers": {"inference-header-content-length": hlen}}
        )
    elif kind == 4:  # outputs and parameters
        body = {
            "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["good day"]}],
            "outputs": [
                {
                    "name": rng.choice(["logits", "boxes", "nope", ""]),
                    "parameters": {
                        "classification": rng.choice([0, -1, 1, 3, True, "2", 10**6, 2.5]),
                        "binary_data": rng.choice([True, False, "yes"]),
                    },
                }
            ],
            "parameters": {"binary_data_output": rng.choice([True, False, 1, None])},
        }
    elif kind == 5:
        body = _odd_json(rng)
    elif kind == 6:
        body = {
            "inputs": [
                {"name": "x" * rng.choice([1, 200]), "datatype": "FP32", "shape": [1, 2], "data": [[1, [2]], {"a": 1}]}
            ]
        }
    elif kind == 7:
        body = {
            "inputs": [
                {"name": inp["name"], "datatype": inp["datatype"], "shape": shape, "data": []}
                for _ in range(rng.randint(1, 20))
            ]
        }
    else:
        body = {"id": _odd_json(rng), "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["ok"]}]}
    text = json.dumps(body, allow_nan=True)
    return Case("v2 request", "POST", path, {"content": text.encode(), "headers": {"content-type": "application/json"}})


def _v2_open_dims_case(rng: random.Random, path: str, spec: list[dict[str, Any]]) -> Case:
    """Every declared input with its open dimensions (-1) filled in the hundreds: [256, 512] token
    ids run for a minute and take gigabytes unless the server holds them to max_length. Mostly
    over the limits (cheap 400s); a few valid ones run through the batcher."""
    rows = rng.choice([1, 2, 64, 256, 257, 300])
    cols = rng.choice([1, 17, 128, 129, 300, 512, 600])
    if rng.random() < 0.5:  # keep the valid, expensive case rare
        rows, cols = rows, max(cols, 129)
    vocab = rng.choice([1000, 30_000, 30_522, 40_000])
    inputs = []
    for t in spec:
        shape = [d if d > 0 else (rows if i == 0 else cols) for i, d in enumerate(t["shape"])]
        n = int(np.prod(shape))
        if n > 400_000:  # an image batch in the hundreds: declared in binary framing, the payload short
            head = json.dumps(
                {
                    "inputs": [
                        {
                            **{k: t[k] for k in ("name", "datatype")},
                            "shape": shape,
                            "parameters": {"binary_data_size": 4096},
                        }
                    ]
                }
            ).encode()
            return Case(
                "v2 open dims binary",
                "POST",
                path,
                {"content": head + bytes(4096), "headers": {"inference-header-content-length": str(len(head))}},
            )
        if t["datatype"] == "INT64":
            nprng = np.random.default_rng(rng.randrange(1 << 30))
            data = (nprng.integers(0, 2, n) if "mask" in t["name"] else nprng.integers(0, vocab, n)).tolist()
        else:
            data = [0.25] * n
        inputs.append({"name": t["name"], "datatype": t["datatype"], "shape": shape, "data": data})
    text = json.dumps({"inputs": inputs})
    return Case(
        "v2 open dims", "POST", path, {"content": text.encode(), "headers": {"content-type": "application/json"}}
    )


def _misc_case(rng: random.Random, models: dict[str, list[str]]) -> Case:
    kind = rng.randrange(5)
    if kind == 0:
        token = rng.choice(["", "Bearer", "Bearer x", "Basic eA==", "Bearer " + "a" * 5000, "bearer \x00"])
        return Case("admin auth", "POST", "/admin/reload", {"headers": {"authorization": token}})
    if kind == 1:
        route = rng.choice(["/classify", "/detect", "/sentiment", "/models", "/v2/models/x/infer"])
        return Case("wrong method", rng.choice(["GET", "PUT", "DELETE", "PATCH"]), route)
    if kind == 2:
        return Case(
            "metadata",
            "GET",
            rng.choice(
                [
                    f"/v2/models/{rng.choice([*models, 'nope', '%00', '..'])}",
                    "/v2/models/x/versions/y/ready",
                    "/v2",
                    "/models",
                ]
            ),
        )
    if kind == 3:
        return Case(
            "huge content-length",
            "POST",
            rng.choice(["/classify", "/sentiment"]),
            {"content": b"{}", "headers": {"content-type": "application/json", "content-length": "2"}},
        )
    return Case(
        "odd query",
        "POST",
        "/classify",
        {
            "params": {"top_k": _odd_value(rng), "model": _odd_value(rng)},
            "content": _image_bytes(rng, "PNG"),
            "headers": {"content-type": "image/png"},
        },
    )


@dataclass
class Failure:
    index: int
    case: str
    detail: str


def _check(resp: httpx.Response, path: str) -> str | None:
    """None when the answer is acceptable, else what is wrong with it."""
    status = resp.status_code
    if status == 503:
        return None if "retry-after" in {k.lower() for k in resp.headers} else "503 without Retry-After"
    if status >= 500:
        return f"{status}: {resp.text[:300]}"
    if 400 <= status < 500:
        try:
            body = resp.json()
        except ValueError:
            return f"{status} with a body that is not JSON: {resp.text[:200]!r}"
        if not isinstance(body, dict) or not body.get("error"):
            return f"{status} without an error message: {resp.text[:200]!r}"
    if 200 <= status < 300 and resp.headers.get("content-type", "").startswith("application/json"):
        try:
            resp.json()
        except ValueError:
            return f"{status} whose JSON body does not parse: {resp.text[:200]!r}"
    return None


def fuzz(
    url: str, requests: int, seed: int, *, timeout: float = 30.0, log: Callable[[str], None] = print
) -> tuple[Counter, list[Failure]]:
    """Send `requests` seeded hostile requests to `url`; the status counts and the failures."""
    rng = random.Random(seed)
    client = httpx.Client(base_url=url, timeout=timeout)
    served = client.get("/models").json()
    entries = served.get("models", served) if isinstance(served, dict) else served
    models: dict[str, list[str]] = {}
    for m in entries if isinstance(entries, list) else []:
        if isinstance(m, dict) and m.get("name"):
            models[m["name"]] = [v for v in (m.get("served_version"),) if v]
    meta = {name: client.get(f"/v2/models/{name}").json() for name in models}
    statuses: Counter = Counter()
    failures: list[Failure] = []
    for i in range(requests):
        r = rng.random()
        if r < 0.3:
            case = _image_case(rng, "/classify", models)
        elif r < 0.45:
            case = _image_case(rng, "/detect", models)
        elif r < 0.7:
            case = _sentiment_case(rng, models)
        elif r < 0.92:
            case = _v2_case(rng, models, meta)
        else:
            case = _misc_case(rng, models)
        try:
            resp = client.request(case.method, case.path, **case.kwargs)
        except (httpx.LocalProtocolError, UnicodeEncodeError):  # the client refused to send it
            statuses["not sendable"] += 1
            continue
        except httpx.HTTPError as e:  # a dropped connection or a timeout is a failure
            failures.append(Failure(i, case.kind, f"{type(e).__name__}: {e}"))
            continue
        statuses[resp.status_code] += 1
        problem = _check(resp, case.path)
        if problem:
            failures.append(Failure(i, f"{case.kind} {case.method} {case.path}", problem))
            log(f"[fuzz] #{i} {case.kind}: {problem}")
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            failures.append(Failure(requests, "readyz", "the server is not ready after the run"))
            break
        time.sleep(0.5)
    client.close()
    return statuses, failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started = time.monotonic()
    statuses, failures = fuzz(args.url, args.requests, args.seed)
    took = time.monotonic() - started
    print(
        f"[fuzz] {args.requests} requests in {took:.0f} s, seed {args.seed}: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str))
    )
    for f in failures:
        print(f"[fuzz] FAIL #{f.index} {f.case}: {f.detail}")
    print(f"[fuzz] {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
