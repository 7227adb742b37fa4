"""JSON request bodies: parsed with their memory held in the worker's budget, large ones off the
event loop, and depth bombs refused with a 400.

Parsing JSON costs far more memory than the body's size: CPython builds an object per value,
and a 20 MiB body of `[[1]],` builds about 640 MB of lists. `json_cost` estimates the peak from
the body's structural characters (a few C-speed `bytes.count` passes) so the parse can hold it
in the `MemoryBudget` first.

Bodies above `INLINE_BYTES` are parsed on a worker thread. That alone does not free the event
loop: CPython's JSON parser holds the GIL from start to end (0.2 s for a 20 MiB tensor, longer on
a busy CPU), and the loop thread waits for it. Large bodies are therefore parsed with numbers
converted by a Python function (`_number`), which gives the interpreter a point to hand the GIL
over every few milliseconds: measured, the longest stall of another thread fell from 203 ms to
26 ms for a 2.4-million-float body, for 60% more parse time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from models.errors import InvalidInput
from models.preprocess import MemoryHold

T = TypeVar("T")

# Below this, parsing takes well under a millisecond: cheaper inline than a thread hop.
INLINE_BYTES = 64 * 1024
# One large parse at a time per worker. The parser holds the GIL from start to end, so two
# threads parsing never overlap anyway; queued on this lock (which waits without the GIL), the
# next parse cannot grab the GIL before the event loop gets its turn between two parses.
_PARSING = threading.Lock()

# Peak bytes per structural character, measured with tracemalloc on CPython 3.11 over bodies
# made of one repeated element (floats, ints, strings, empty and one-element lists, dicts):
# a list ~64 B, a dict ~190 B, a value's object and its slot in a container ~40 B, a string's
# header ~50 B; the body's own text twice over (the str decoded from the bytes, string values).
_PER_LIST = 72
_PER_DICT = 200
_PER_ITEM = 40
_PER_QUOTE = 28  # two quotes per string: ~56 B of string header each


def json_cost(body: bytes) -> int:
    """Estimated peak bytes of parsing `body` with `json.loads` (an over-estimate: characters
    inside strings are counted as structure too)."""
    items = body.count(b",") + body.count(b":") + 1
    return (
        2 * len(body)
        + _PER_LIST * body.count(b"[")
        + _PER_DICT * body.count(b"{")
        + _PER_ITEM * items
        + _PER_QUOTE * body.count(b'"')
    )


def _float(text: str) -> float:
    return float(text)


def _int(text: str) -> int:
    return int(text)


def load_json(body: bytes, *, what: str = "body", yielding: bool = False) -> Any:
    """Parse UTF-8 JSON, or raise InvalidInput naming the problem (the caller holds the memory).

    `yielding`: convert numbers in Python, so that other threads get the GIL during a long parse.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{what} is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})") from e
    try:
        return json.loads(text, parse_float=_float, parse_int=_int) if yielding else json.loads(text)
    except RecursionError as e:
        # CPython's parser recurses once per nesting level and stops near the recursion limit.
        raise InvalidInput(f"{what} is JSON nested too deeply (hundreds of levels); no request here needs that") from e
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e


def parse_held(body: bytes, convert: Callable[[Any], T], budget: MemoryHold | None, *, what: str = "body") -> T:
    """Parse `body` and turn the result into what the request needs (`convert`), holding the
    parse's estimated memory in `budget` until the parsed objects are garbage."""
    if len(body) < INLINE_BYTES:
        return convert(load_json(body, what=what))
    with budget.hold(json_cost(body)) if budget is not None else contextlib.nullcontext(), _PARSING:
        return convert(load_json(body, what=what, yielding=True))


async def off_loop(executor: Executor, size: int, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` inline when the body is small, else on `executor` (the decode threads)."""
    if size < INLINE_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
