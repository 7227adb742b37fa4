"""A fleet under fire: two `bentoml serve` instances poll one registry under steady load while an
operator does every bad thing issue 19 lists, plus a fine-tune killed midway and a prune.

Asserted throughout: no request of the steady load fails, both instances answer /readyz 200,
and hostile requests get 4xx (or 503) only. Asserted at the end: both serve the version they
should, and a third instance started on the final registry (its newest version broken) becomes
ready on the newest working one. Every wait polls with a deadline; the test stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models import versions
from models.artifact import MANIFEST, write_manifest
from models.manifest import Manifest
from scripts import registry as registry_cli
from scripts.pressure import worst_case_png
from scripts.server_process import REPO, BentoServer
from tests import faults
from tests.conftest import encode

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TOKEN = "chaos-admin-token"
IMAGE = encode(Image.new("RGB", (48, 40), (120, 40, 200)))
IMG, TXT = "image-classification", "sentiment"


class SteadyLoad:
    """Closed-loop clients on every server: /classify and /sentiment; every answer must be a 200."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.ok = 0
        self.failures: list[str] = []
        self.seen: dict[tuple[str, str], str] = {}  # (url, model) -> last version answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _client(self, url: str, route: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    if route == "/classify":
                        r = await client.post(route, files={"image": ("x.png", IMAGE)})
                    else:
                        r = await client.post(route, json={"texts": ["the crew was lovely", "lost my bag"]})
                except httpx.HTTPError as e:
                    self.failures.append(f"{url}{route}: {e!r}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{url}{route}: {r.status_code} {r.text[:200]}")
                    continue
                self.ok += 1
                model = r.json()["model"]
                self.seen[(url, model["name"])] = model["version"]

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(u, r) for u in self.urls for r in ("/classify", "/classify", "/sentiment")))

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


class ReadinessWatch:
    """Polls /readyz of every server every 100 ms and records anything but a 200."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.polls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                for url in self.urls:
                    try:
                        r = client.get(url + "/readyz")
                        if r.status_code != 200:
                            self.failures.append(f"{url}: /readyz {r.status_code} at {time.monotonic():.1f}")
                    except httpx.HTTPError as e:
                        self.failures.append(f"{url}: /readyz {e!r}")
                self.polls += 1
                self._stop.wait(0.1)

    def __enter__(self) -> ReadinessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def models_of(url: str) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.get(url + "/models", timeout=30).json()["models"]}


def settle(urls: list[str], what: str, condition: Callable[[dict[str, dict]], bool], timeout: float = 60) -> None:
    """Wait until every server's /models satisfies `condition` (they poll the registry)."""
    deadline = time.monotonic() + timeout
    while True:
        reports = {u: models_of(u) for u in urls}
        if all(condition(r) for r in reports.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s:\n{json.dumps(reports, indent=1)[:4000]}")
        time.sleep(0.2)


def serves(name: str, version: str) -> Callable[[dict[str, dict]], bool]:
    return lambda r: name in r and r[name]["served_version"] == version


def refused(name: str, version: str, needle: str, still_serving: str) -> Callable[[dict[str, dict]], bool]:
    def check(r: dict[str, dict]) -> bool:
        errors = {e["version"]: e["error"] for e in r.get(name, {}).get("errors", [])}
        return r[name]["served_version"] == still_serving and needle in errors.get(version, "")

    return check


def tiny_image_folder(root: Path) -> Path:
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200)), ("green", (30, 200, 30))):
        (root / label).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 40), tuple(min(255, c + 3 * i) for c in colour)).save(root / label / f"{i}.png")
    return root


def start_finetune(registry: Path, data: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "scripts.finetune", "image-classification", "--quick", "--data", str(data)]
    cmd += ["--epochs", "1", "--name", "chaos-tune", "--registry", str(registry)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def kill_when_staged(proc: subprocess.Popen[bytes], registry: Path, timeout: float = 240) -> Path:
    """SIGKILL the fine-tune as soon as its staging folder holds a file; returns that folder."""
    staging = registry / versions.STAGING_DIR / "chaos-tune"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the fine-tune ended (rc {proc.returncode}) before it could be killed midway")
        folders = [p for p in staging.iterdir() if p.is_dir()] if staging.is_dir() else []
        if folders and any(f.is_file() for f in folders[0].iterdir()):
            proc.kill()
            proc.wait(30)
            return folders[0]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the fine-tune never reached its staging step")


def test_two_servers_on_one_registry_survive_every_fault(
    tmp_path: Path, image_artifact: Path, sentiment_artifact: Path, detection_artifact: Path
) -> None:
    started = time.monotonic()
    reg = tmp_path / "registry"
    for art in (image_artifact, sentiment_artifact, detection_artifact):
        shutil.copytree(art, reg / art.parent.name / art.name)
    v1, s1 = image_artifact.name, sentiment_artifact.name
    env = {
        "GRAFT_WORKERS": "1",
        "GRAFT_RELOAD_INTERVAL": "0.5",
        "GRAFT_ADMIN_TOKEN": TOKEN,
        "GRAFT_ACCESS_LOG": "0",
        "GRAFT_MEMORY_MB": "1536",
    }
    # A fine-tune of a new model runs alongside everything below; a watcher kills it (SIGKILL)
    # the moment its staging folder holds a file, i.e. while it writes its artifact.
    tune = start_finetune(reg, tiny_image_folder(tmp_path / "tiny"), tmp_path / "finetune.log")
    killed: list[Path | BaseException] = []

    def kill_midway() -> None:
        try:
            killed.append(kill_when_staged(tune, reg))
        except BaseException as e:  # reported by the main thread
            killed.append(e)

    killer = threading.Thread(target=kill_midway, daemon=True)
    killer.start()
    a = BentoServer(reg, env=env, log_path=tmp_path / "a.log")
    b = BentoServer(reg, env=env, log_path=tmp_path / "b.log")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(BentoServer.start, (a, b)))
    urls = [a.url, b.url]
    hostile: list[str] = []  # hostile requests answered with something other than a 4xx or 503

    def expect_4xx(r: httpx.Response, what: str) -> None:
        if not (400 <= r.status_code < 500 or r.status_code == 503) or "error" not in r.json():
            hostile.append(f"{what}: {r.status_code} {r.text[:200]}")

    try:
        with SteadyLoad(urls) as load, ReadinessWatch(urls) as ready:
            settle(urls, "both serving", lambda r: r[IMG]["served_version"] == v1 and r[TXT]["served_version"] == s1)

            # 1. model names with nothing servable: an empty folder, one holding only old-style staging
            faults.empty_model_folder(reg, "empty-model")
            faults.staging_only_model_folder(reg, "half-trained")
            settle(
                urls,
                "empty model names reported",
                lambda r: all(n in r and r[n]["status"] == "unavailable" for n in ("empty-model", "half-trained")),
            )

            # 2. versions ONNX Runtime cannot load, checksums right: refused, reported, the old one kept
            v2 = faults.publish_copy(image_artifact, reg, mutate=faults.truncate_model)
            s2 = faults.publish_copy(sentiment_artifact, reg, mutate=faults.future_opset)
            settle(urls, "unloadable image version refused", refused(IMG, v2, "ONNX Runtime cannot load", v1))
            settle(urls, "unloadable sentiment version refused", refused(TXT, s2, "ONNX Runtime cannot load", s1))
            r = httpx.post(a.url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["outcomes"][IMG]["to"] == v1 and r.json()["workers"]["converged"], r.json()

            # a copy in two steps (manifest first): refused while half there, served once complete
            v3, finish = faults.copy_in_two_steps(image_artifact, reg)
            settle(urls, "half-copied version refused", refused(IMG, v3, "model.onnx is missing", v1))
            finish()
            settle(urls, "completed copy served", serves(IMG, v3))

            # 4. /v2 tensors past the model's limits: refused at once, the batcher untouched
            for url in urls:
                with httpx.Client(base_url=url, timeout=60) as c:
                    big = np.ones((256, 512), np.int64).reshape(-1).tolist()
                    inputs = [
                        {"name": n, "datatype": "INT64", "shape": [256, 512], "data": big}
                        for n in ("input_ids", "attention_mask")
                    ]
                    expect_4xx(c.post(f"/v2/models/{TXT}/infer", json={"inputs": inputs}), "v2 [256, 512]")
                    oov = [
                        {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 999_999]},
                        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]},
                    ]
                    expect_4xx(c.post(f"/v2/models/{TXT}/infer", json={"inputs": oov}), "v2 out-of-vocabulary")
                    # 5. JSON nested 10,000 deep
                    bomb = ("[" * 10_000 + "]" * 10_000).encode()
                    for path in ("/sentiment", f"/v2/models/{TXT}/infer"):
                        expect_4xx(c.post(path, content=bomb, headers={"content-type": "application/json"}), path)

            # 6. eight concurrent worst-case legal uploads (6,300 x 6,300 RGBA), four per server
            png = worst_case_png()

            async def uploads() -> list[int]:
                async with httpx.AsyncClient(timeout=120) as c:
                    rs = await asyncio.gather(
                        *(c.post(urls[i % 2] + "/classify", files={"image": ("w.png", png)}) for i in range(8))
                    )
                return [r.status_code for r in rs]

            codes = asyncio.run(uploads())
            assert set(codes) <= {200, 503} and 200 in codes, codes

            # a fine-tune killed while it writes its artifact: nothing appears in a model folder
            killer.join(240)
            assert killed and isinstance(killed[0], Path), killed or "the fine-tune was not killed in time"
            assert tune.returncode == -9 and killed[0].parent.parent == reg / versions.STAGING_DIR
            assert not (reg / "chaos-tune").exists(), "a killed fine-tune must leave nothing in model folders"

            # prune while serving: the served version survives whatever --keep says
            v4 = faults.publish_copy(image_artifact, reg, mutate=faults.unknown_op_domain)
            settle(urls, "unknown-op version refused", refused(IMG, v4, "com.example.missing", v3))
            prune = ["--registry", str(reg), "prune", IMG, "--keep", "1", "--url", a.url, "--url", b.url]
            assert registry_cli.main(prune) == 0
            assert sorted(versions.list_versions(reg, IMG)) == sorted([v3, v4])
            settle(urls, "pruned versions forgotten", lambda r: {e["version"] for e in r[IMG]["errors"]} == {v4})

            # an import publishes atomically; then a broken newest version on top of it
            outside = tmp_path / "incoming"
            shutil.copytree(image_artifact, outside / IMG / "x")
            v5 = versions_new_id(outside / IMG / "x")
            assert registry_cli.main(["--registry", str(reg), "import", str(outside / IMG / v5)]) == 0
            settle(urls, "imported version served", serves(IMG, v5))
            v6 = faults.publish_copy(image_artifact, reg, mutate=faults.truncate_model)
            settle(urls, "broken newest refused", refused(IMG, v6, "ONNX Runtime cannot load", v5))

            # 3. a server starting now (its newest version unloadable) becomes ready on v5
            c_srv = BentoServer(reg, env=env, log_path=tmp_path / "c.log").start()
            try:
                fresh = models_of(c_srv.url)
                assert fresh[IMG]["served_version"] == v5 and fresh[TXT]["served_version"] == s1
                assert v6 in {e["version"] for e in fresh[IMG]["errors"]}
                assert fresh["empty-model"]["status"] == "unavailable" and "chaos-tune" not in fresh
            finally:
                c_srv.stop()
            load_ok_before_end = load.ok
            deadline = time.monotonic() + 30
            while any(load.seen.get((u, IMG)) != v5 for u in urls) and time.monotonic() < deadline:
                time.sleep(0.1)

        assert not load.failures, load.failures[:10]
        assert load.ok > 100 and load.ok >= load_ok_before_end
        assert not ready.failures and ready.polls > 50, ready.failures[:10]
        assert not hostile, hostile
        assert all(load.seen[(u, IMG)] == v5 and load.seen[(u, TXT)] == s1 for u in urls), load.seen
        for url in urls:
            text = json.dumps(models_of(url))
            assert str(reg) not in text and "/tmp/" not in text
    finally:
        a.stop()
        b.stop()
        if tune.poll() is None:
            tune.kill()
    print(f"chaos test: {time.monotonic() - started:.0f} s, {load.ok} good requests, {ready.polls} readiness rounds")


def versions_new_id(folder: Path) -> str:
    """Give the artifact in `folder` a fresh version id (renaming the folder to match)."""
    version = faults._new_id()
    manifest = Manifest.model_validate_json((folder / MANIFEST).read_text())
    write_manifest(folder, manifest.model_copy(update={"version": version}))
    folder.rename(folder.parent / version)
    return version
