"""Model lifecycle against a real server: hot reload under load with two workers, a corrupt
version refused and reported, rollback by pin, admin auth, registry polling, and the CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from scripts import registry as registry_cli
from scripts.server_process import BentoServer
from tests import faults
from tests.conftest import encode

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TOKEN = "test-admin-token-123"
IMAGE = encode(Image.new("RGB", (40, 40), (90, 30, 200)))


def clone_version(src: Path, registry: Path, *, corrupt: bool = False) -> str:
    """Publish a copy of `src` into `registry` as a new version, atomically (as an operator would);
    `corrupt`: its model.onnx changed after the manifest was written (a checksum mismatch)."""
    version = faults.publish_copy(src, registry)
    if corrupt:
        faults.corrupt_after_hashing(registry / src.parent.name / version)
    return version


@pytest.fixture
def own_registry(tmp_path: Path, image_artifact: Path) -> Path:
    reg = tmp_path / "registry"
    (reg / image_artifact.parent.name).mkdir(parents=True)
    shutil.copytree(image_artifact, reg / image_artifact.parent.name / image_artifact.name)
    return reg


class Load:
    """Closed-loop load from a background thread: `concurrency` clients posting /classify."""

    def __init__(self, url: str, concurrency: int = 4) -> None:
        self.url = url
        self.concurrency = concurrency
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            try:
                r = await client.post("/classify", files={"image": ("x.png", IMAGE)})
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    self.versions.append(r.json()["model"]["version"])
            except httpx.HTTPError as e:
                self.failures.append(repr(e))

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.concurrency)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.versions)
        while len(self.versions) - start < n and time.monotonic() < deadline:
            time.sleep(0.05)


def reload(url: str, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/admin/reload", headers=headers, timeout=120)


def model_entry(url: str) -> dict:
    return next(m for m in httpx.get(url + "/models").json()["models"] if m["name"] == "image-classification")


def test_hot_reload_under_load_two_workers(own_registry: Path, image_artifact: Path, tmp_path: Path) -> None:
    v1 = image_artifact.name
    env = {"GRAFT_WORKERS": "2", "GRAFT_ADMIN_TOKEN": TOKEN, "GRAFT_STATE_DIR": str(tmp_path / "state")}
    with BentoServer(own_registry, env=env) as srv, Load(srv.url) as load:
        load.wait_for(20)

        # Auth: missing header 401, wrong token 403; nothing changes.
        assert reload(srv.url, token=None).status_code == 401
        assert reload(srv.url, token="wrong").status_code == 403

        # A new version appears and is reloaded while traffic flows.
        v2 = clone_version(image_artifact, own_registry)
        r = reload(srv.url)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["changed"]["image-classification"] == {"from": v1, "to": v2}
        assert body["workers"]["expected"] == 2 and body["workers"]["converged"], body["workers"]
        load.wait_for(30)
        after_swap = load.versions[-20:]
        assert set(after_swap) == {v2}, "every worker should answer with the new version"

        # A corrupt version is refused, reported, and never served.
        v3 = clone_version(image_artifact, own_registry, corrupt=True)
        r = reload(srv.url)
        assert r.status_code == 200 and r.json()["workers"]["converged"]
        assert r.json()["outcomes"]["image-classification"] == {"from": v2, "to": v2, "refused": [v3]}
        entry = model_entry(srv.url)
        assert entry["served_version"] == v2
        errors = {e["version"]: e["error"] for e in entry["errors"]}
        assert v3 in errors and "checksum mismatch for model.onnx" in errors[v3]
        load.wait_for(20)

        # So is a version ONNX Runtime cannot load (checksums right): the reload still answers 2xx.
        v4 = faults.publish_copy(image_artifact, own_registry, mutate=faults.truncate_model)
        r = reload(srv.url)
        assert r.status_code == 200 and r.json()["outcomes"]["image-classification"]["refused"] == [v4], r.text
        assert "ONNX Runtime cannot load" in {e["version"]: e["error"] for e in model_entry(srv.url)["errors"]}[v4]
        assert httpx.get(srv.url + "/readyz").status_code == 200

        # Rollback: pin the first version.
        assert registry_cli.main(["--registry", str(own_registry), "pin", "image-classification", v1]) == 0
        r = reload(srv.url)
        assert r.json()["changed"]["image-classification"] == {"from": v2, "to": v1}
        load.wait_for(20)
        assert set(load.versions[-10:]) == {v1}

    assert not load.failures, load.failures[:5]
    assert {v1, v2} <= set(load.versions)
    assert v3 not in load.versions and v4 not in load.versions


def test_admin_routes_refuse_everything_without_a_configured_token(own_registry: Path) -> None:
    with BentoServer(own_registry, env={"GRAFT_ADMIN_TOKEN": ""}) as srv:
        r = reload(srv.url, token="anything")
        assert r.status_code == 403 and "GRAFT_ADMIN_TOKEN" in r.json()["error"]


def test_polling_picks_up_new_versions_without_a_call(own_registry: Path, image_artifact: Path) -> None:
    with BentoServer(own_registry, env={"GRAFT_RELOAD_INTERVAL": "0.5"}) as srv:
        v2 = clone_version(image_artifact, own_registry)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and model_entry(srv.url)["served_version"] != v2:
            time.sleep(0.2)
        assert model_entry(srv.url)["served_version"] == v2
        r = httpx.post(srv.url + "/classify", files={"image": ("x.png", IMAGE)})
        assert r.json()["model"]["version"] == v2


def test_registry_cli_verify_prune_import(own_registry: Path, image_artifact: Path, tmp_path: Path, capsys) -> None:
    name = image_artifact.parent.name
    v2 = clone_version(image_artifact, own_registry)
    v3 = clone_version(image_artifact, own_registry, corrupt=True)
    assert registry_cli.main(["--registry", str(own_registry), "verify"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {name}/{v3}" in out and f"ok   {name}/{v2}" in out
    assert registry_cli.served_version(own_registry, name) == v2  # newest *valid*
    assert registry_cli.main(["--registry", str(own_registry), "prune", name, "--keep", "1"]) == 0
    left = sorted(p.name for p in (own_registry / name).iterdir())
    assert left == sorted([v2, v3])  # newest kept, served kept, the old one deleted
    other = tmp_path / "other"
    assert registry_cli.main(["--registry", str(other), "import", str(own_registry / name / v2)]) == 0
    assert (other / name / v2 / "manifest.json").is_file()
    assert json.loads((other / name / v2 / "manifest.json").read_text())["version"] == v2
