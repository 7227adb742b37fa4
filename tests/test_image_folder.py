"""A user's own ImageFolder data, continued from an earlier artifact (--init-from) with new
classes, served under the user's model name."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from PIL import Image

from models.artifact import load_artifact
from scripts.finetune import main as finetune
from scripts.server_process import BentoServer
from tests.conftest import encode

pytestmark = pytest.mark.slow

CLASSES = {1: "trouser", 7: "sneaker", 8: "bag"}  # Fashion-MNIST ids -> folder names


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, fashion_test) -> Path:
    """root/<class>/*.png|jpg with 70 images per class, mixed formats and sizes."""
    x, y = fashion_test
    root = tmp_path_factory.mktemp("shop") / "shop"
    for cid, cname in CLASSES.items():
        (root / cname).mkdir(parents=True)
        for n, i in enumerate((y == cid).nonzero()[0][:70]):
            img = Image.fromarray(x[i]).resize((56 + n % 3 * 20, 56))
            fmt = "JPEG" if n % 2 else "PNG"
            (root / cname / f"{n:03d}.{fmt.lower()}").write_bytes(encode(img, fmt))
    return root


def test_init_from_with_new_classes_then_serve(image_folder: Path, image_artifact: Path, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    folder = finetune(
        [
            "image-classification",
            "--quick",
            "--data",
            str(image_folder),
            "--registry",
            str(reg),
            "--name",
            "shop-items",
            "--init-from",
            str(image_artifact),
            "--epochs",
            "3",
        ]
    )
    m = load_artifact(folder).manifest
    assert m.name == "shop-items" and m.labels == sorted(CLASSES.values())
    assert m.training.init_from == f"{image_artifact.parent.name}/{image_artifact.name}"
    assert any("head re-initialised" in n for n in m.training.notes)
    assert m.training.dataset.splits["test"] >= 20
    assert m.metrics.values["accuracy"] >= 0.8
    assert m.export.parity.passed

    with BentoServer(reg) as srv:
        x_img = Image.open(next((image_folder / "bag").glob("*.png")))
        r = httpx.post(srv.url + "/classify", files={"image": ("b.png", encode(x_img))}, data={"model": "shop-items"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["name"] == "shop-items"
        assert {p["label"] for p in body["predictions"]} == set(CLASSES.values())
        # The default model for the task is this one too: it is the only classifier here.
        r2 = httpx.post(srv.url + "/classify", files={"image": ("b.png", encode(x_img))})
        assert r2.json()["model"]["name"] == "shop-items"


def test_init_from_refuses_another_task(tmp_path: Path, image_artifact: Path) -> None:
    with pytest.raises((SystemExit, Exception)):
        finetune(["image-classification", "--quick", "--registry", str(tmp_path), "--init-from", "no-such-model"])
