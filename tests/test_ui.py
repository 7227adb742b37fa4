"""The demo page in a real headless Chromium: upload an image, see its classes."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import encode

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromium-driver are required (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chrome')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.set_window_size(1280, 900)
    yield driver
    driver.quit()


# The parts of the image panel, top to bottom; none may be drawn over another.
IMAGE_PANEL = ("section:first-of-type > h2", "#drop", "#canvas", "#classify-results", "#detect-results")


def overlaps(browser, selectors: tuple[str, ...]) -> list[str]:
    """Pairs of visible elements whose boxes on the page intersect (with their rectangles, to debug)."""
    rects = browser.execute_script(
        """return arguments[0].map((sel) => {
             const el = document.querySelector(sel);
             if (!el) return null;
             const r = el.getBoundingClientRect();
             return {sel, x1: r.left, y1: r.top, x2: r.right, y2: r.bottom};
           });""",
        list(selectors),
    )
    missing = [sel for sel, r in zip(selectors, rects, strict=True) if r is None]
    assert not missing, f"not on the page: {missing}"
    shown = [r for r in rects if r["x2"] - r["x1"] > 0 and r["y2"] - r["y1"] > 0]
    bad = []
    for i, a in enumerate(shown):
        for b in shown[i + 1 :]:
            if (
                min(a["x2"], b["x2"]) - max(a["x1"], b["x1"]) > 0.5
                and min(a["y2"], b["y2"]) - max(a["y1"], b["y1"]) > 0.5
            ):
                bad.append(f"{a} overlaps {b}")
    return bad


def test_upload_an_image_and_see_its_classes(browser, server, fashion_test, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    x, _ = fashion_test
    picture = tmp_path / "item.png"
    picture.write_bytes(encode(Image.fromarray(x[0]).resize((112, 112))))
    expected = httpx.post(server.url + "/classify", files={"image": ("i.png", picture.read_bytes())}).json()

    browser.get(server.url + "/ui")
    wait = WebDriverWait(browser, 30)
    wait.until(ec.text_to_be_present_in_element((By.ID, "models"), "image-classification:"))
    assert expected["model"]["version"] in browser.find_element(By.ID, "models").text
    assert browser.execute_script("return window.innerWidth") >= 1200  # the desktop layout is the one checked
    assert not overlaps(browser, IMAGE_PANEL), "the empty page draws one part over another"

    browser.find_element(By.ID, "image-input").send_keys(str(picture))
    wait.until(ec.text_to_be_present_in_element((By.ID, "classify-results"), "answered by"))
    results = browser.find_element(By.ID, "classify-results").text
    assert expected["predictions"][0]["label"] in results.splitlines()[1]
    assert f"answered by image-classification {expected['model']['version']}" in results
    assert browser.find_element(By.ID, "canvas").is_displayed()
    assert not overlaps(browser, IMAGE_PANEL), "with results shown, one part is drawn over another"


def test_type_text_and_see_its_sentiment(browser, server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    text = "The crew was wonderful and the flight was early"
    expected = httpx.post(server.url + "/sentiment", json={"texts": [text]}).json()
    browser.get(server.url + "/ui")
    wait = WebDriverWait(browser, 30)
    wait.until(ec.text_to_be_present_in_element((By.ID, "models"), "sentiment:"))
    box = browser.find_element(By.ID, "text-input")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "sentiment-button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "sentiment-results"), "answered by"))
    results = browser.find_element(By.ID, "sentiment-results").text
    assert text in results and expected["results"][0]["label"] in results
    assert f"answered by sentiment {expected['model']['version']}" in results


def test_upload_a_scene_and_see_its_boxes_drawn(browser, server, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_detection import _demo_test_split

    scene = _demo_test_split().images[0]
    picture = tmp_path / "scene.jpg"
    picture.write_bytes(scene.path.read_bytes())
    expected = httpx.post(server.url + "/detect", files={"image": ("s.jpg", picture.read_bytes())}).json()
    assert expected["detections"], "the detector finds nothing on a test scene"

    browser.get(server.url + "/ui")
    wait = WebDriverWait(browser, 30)
    wait.until(ec.text_to_be_present_in_element((By.ID, "models"), "object-detection:"))
    browser.find_element(By.ID, "image-input").send_keys(str(picture))
    wait.until(ec.text_to_be_present_in_element((By.ID, "detect-results"), "answered by"))
    results = browser.find_element(By.ID, "detect-results").text
    assert f"Boxes ({len(expected['detections'])})" in results
    assert f"answered by object-detection {expected['model']['version']}" in results
    # The boxes are drawn: the canvas holds pixels of the box colour (#f04438) that the photo lacks.
    red = browser.execute_script(
        """const c = document.getElementById('canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] === 240 && d[i + 1] === 68 && d[i + 2] === 56) n++;
        return n;"""
    )
    assert red > 100, f"only {red} box-coloured pixels on the canvas"
    assert not overlaps(browser, IMAGE_PANEL)
