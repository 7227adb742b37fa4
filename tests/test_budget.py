"""Bounded memory per request: the worker's memory budget, and the estimates that go into it
(image decoding, JSON parsing) checked against what the work really costs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import InvalidInput
from models.manifest import ImagePreprocessing
from models.preprocess import ImagePreprocessor, _to_rgb, open_image
from service.bodies import json_cost, load_json
from service.budget import MB, MemoryBudget, derive_budget

REPO = Path(__file__).resolve().parent.parent


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_budget_serves_in_arrival_order_and_never_overcommits() -> None:
    budget = MemoryBudget(100)
    order: list[str] = []
    release_a = threading.Event()

    def take(label: str, n: int, release: threading.Event | None = None) -> None:
        with budget.hold(n):
            order.append(label)
            assert budget.stats.held <= budget.limit
            if release is not None:
                release.wait(10)

    a = threading.Thread(target=take, args=("a", 60, release_a))
    a.start()
    _wait_until(lambda: order == ["a"])
    b = threading.Thread(target=take, args=("b", 80))  # does not fit while a holds 60
    b.start()
    _wait_until(lambda: len(budget._line) == 1)
    c = threading.Thread(target=take, args=("c", 10))  # would fit now, but b came first
    c.start()
    _wait_until(lambda: len(budget._line) == 2)
    assert order == ["a"]
    release_a.set()
    for t in (a, b, c):
        t.join(10)
    assert order == ["a", "b", "c"]
    assert budget.stats.held == 0 and 80 <= budget.stats.peak <= 90 and budget.stats.waited == 2


def test_budget_answers_503_when_its_turn_does_not_come_and_413_beyond_the_whole_budget() -> None:
    budget = MemoryBudget(100, wait_s=0.2)
    with budget.hold(100):
        started = time.monotonic()
        with pytest.raises(InvalidInput, match="retry shortly") as e, budget.hold(1):
            pass
        assert e.value.status_code == 503 and 0.15 < time.monotonic() - started < 5
    with pytest.raises(InvalidInput, match="needs about") as e, budget.hold(101):
        pass
    assert e.value.status_code == 413
    assert budget.stats.held == 0 and budget.stats.busy == 1 and budget.stats.too_large == 1
    with budget.hold(100):  # the failed attempts left nothing behind
        pass


def test_budget_is_derived_from_the_pod_memory_limit() -> None:
    limit, source = derive_budget(
        explicit_mb=None, pod_limit_mb=1536, workers=2, worker_rss=300 * MB, parent_rss=100 * MB
    )
    assert limit == int((1536 - 100) / 2 * MB - 300 * MB - 96 * MB)
    assert "1,536 MB memory limit" in source
    assert derive_budget(explicit_mb=200, pod_limit_mb=1536, workers=2, worker_rss=0, parent_rss=0)[0] == 200 * MB
    tiny, source = derive_budget(explicit_mb=None, pod_limit_mb=512, workers=2, worker_rss=400 * MB, parent_rss=0)
    assert tiny == 64 * MB and "floor" in source


# ---- JSON ------------------------------------------------------------------------------------
BODIES = {
    "floats": "[" + ",".join(["0.5"] * 50_000) + "]",
    "small ints": "[" + ",".join(["7"] * 50_000) + "]",
    "empty lists": "[" + ",".join(["[]"] * 50_000) + "]",
    "one-element lists": "[" + ",".join(["[[1]]"] * 50_000) + "]",
    "small dicts": "[" + ",".join(['{"a":1}'] * 50_000) + "]",
    "strings": "[" + ",".join(['"ab"'] * 50_000) + "]",
    "many keys": "{" + ",".join(f'"k{i}":1' for i in range(50_000)) + "}",
    "v2 tensor": json.dumps({"inputs": [{"name": "input", "shape": [50_000], "data": [0.123456] * 50_000}]}),
}


@pytest.mark.parametrize("yielding", [False, True])
@pytest.mark.parametrize("name", sorted(BODIES))
def test_json_cost_covers_the_parse_peak(name: str, yielding: bool) -> None:
    body = BODIES[name].encode()
    tracemalloc.start()
    try:
        parsed = load_json(body, yielding=yielding)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del parsed
    cost = json_cost(body)
    assert peak <= cost <= 6 * peak, (name, peak, cost)


def test_depth_bombs_are_invalid_input() -> None:
    for bomb in ("[" * 10_000 + "]" * 10_000, '{"a":' * 10_000 + "1" + "}" * 10_000):
        for yielding in (False, True):
            with pytest.raises(InvalidInput, match="nested too deeply"):
                load_json(bomb.encode(), yielding=yielding)


def test_yielding_parse_gives_the_same_values_and_lets_other_threads_run() -> None:
    body = json.dumps({"data": [0.123456 + i for i in range(1_500_000)], "ids": list(range(-5, 500_000))}).encode()
    t0 = time.perf_counter()
    plain = load_json(body)
    plain_s = time.perf_counter() - t0  # the plain parser holds the GIL this long in one go
    assert load_json(body, yielding=True) == plain
    stalls: list[float] = []
    done = threading.Event()

    def parse() -> None:
        load_json(body, yielding=True)
        done.set()

    worker = threading.Thread(target=parse)
    worker.start()
    while not done.is_set():
        t0 = time.perf_counter()
        time.sleep(0.001)
        stalls.append(time.perf_counter() - t0)
    worker.join()
    assert max(stalls) < plain_s / 2, (max(stalls), plain_s)


# ---- images ----------------------------------------------------------------------------------
def _image(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if mode == "I;16":
        return Image.fromarray(base[..., 0].astype(np.uint16) * 257 + base[..., 1])
    if mode == "I":
        return Image.fromarray(base[..., 0].astype(np.int32) * 1000 - 5)
    if mode == "F":
        return Image.fromarray(base[..., 0].astype(np.float32) * 0.3)
    if mode == "P":
        img = Image.fromarray(base[..., :3]).convert("P")
        img.info["transparency"] = 3
        return img
    return Image.fromarray(base, "RGBA").convert(mode)


SPECS = [
    ImagePreprocessing(height=64, width=64),
    ImagePreprocessing(height=256, width=320, resize="letterbox"),
    ImagePreprocessing(height=224, width=224, interpolation="bicubic"),
]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "I", "F", "CMYK", "1"])
def test_strip_wise_shrinking_gives_the_same_pixels_as_converting_the_whole_image(mode: str) -> None:
    """The serving path converts and reduces large images strip by strip to save memory; the
    answer must be what converting the whole image and resizing it gives, pixel for pixel."""
    for i, (w, h) in enumerate([(1500, 1100), (2999, 701), (97, 1801), (40, 30)]):
        img = _image(mode, w, h, seed=i)
        for spec in SPECS:
            pre = ImagePreprocessor(spec)
            served, geometry = pre.resize(img)
            size = pre._plan(w, h)[0]
            whole = _to_rgb(img).resize(size, pre._resample, reducing_gap=3.0)
            reference = Image.new("RGB", pre.size, (spec.pad_value,) * 3)
            reference.paste(whole, (int(geometry.pad_x), int(geometry.pad_y)))
            np.testing.assert_array_equal(np.asarray(served), np.asarray(reference), err_msg=f"{mode} {w}x{h}")


_PEAK_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from models.manifest import ImagePreprocessing
    from models.preprocess import ImagePreprocessor, open_image
    data = open({path!r}, "rb").read()
    pre = ImagePreprocessor(ImagePreprocessing(height=256, width=320, resize="letterbox"))
    cost = pre.decode_cost(open_image(data))
    def rss(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
    before = rss("VmRSS:")
    pre.from_bytes(data, draft=False)
    print(cost, rss("VmHWM:") - before)
    """
)


@pytest.mark.parametrize(
    ("mode", "fmt", "exif"),
    [
        ("RGBA", "PNG", False),
        ("RGB", "JPEG", True),
        ("I;16", "PNG", False),
        ("CMYK", "JPEG", False),
        ("L", "PNG", False),
    ],
)
def test_decode_cost_covers_the_measured_peak(tmp_path: Path, mode: str, fmt: str, exif: bool) -> None:
    """Measured in a fresh process (its high-water mark), for a 4000 x 3000 upload."""
    img = _image(mode, 4000, 3000)
    extra = {}
    if exif:
        e = Image.Exif()
        e[0x0112] = 6
        extra["exif"] = e.tobytes()
    buf = io.BytesIO()
    img.save(buf, fmt, **extra)
    path = tmp_path / f"upload.{fmt.lower()}"
    path.write_bytes(buf.getvalue())
    script = _PEAK_SCRIPT.format(repo=str(REPO), path=str(path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    cost, peak = map(int, out.stdout.split())
    assert peak <= cost, f"{mode}: decoding peaked at {peak / MB:.0f} MB, the estimate was {cost / MB:.0f} MB"
    assert cost <= 2 * peak + 16 * MB, f"{mode}: the estimate {cost / MB:.0f} MB is far above {peak / MB:.0f} MB"


def test_the_worst_legal_upload_costs_its_own_size_not_five_copies() -> None:
    """A 6,300 x 6,300 RGBA PNG (39.7 MP, under the 40 MP limit) is 159 MB decoded; converting
    it whole to RGB held about 5 copies (measured 777 MB). The estimate must stay near one."""
    w = h = 6300
    header = io.BytesIO()
    Image.new("RGBA", (8, 8)).save(header, "PNG")
    png = bytearray(header.getvalue())
    png[16:24] = w.to_bytes(4, "big") + h.to_bytes(4, "big")  # IHDR size; only the header is read
    import zlib

    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    img = open_image(bytes(png))
    assert img.size == (w, h) and img.mode == "RGBA"
    for spec in SPECS:
        cost = ImagePreprocessor(spec).decode_cost(img)
        assert w * h * 4 < cost < w * h * 4 + 32 * MB, cost / MB
