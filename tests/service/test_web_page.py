"""The web page in headless Chromium: upload an image, see boxes, labels and masks drawn."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import IMAGES, MASK_R50
from tests.service.conftest import SAME_SHAPE, LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]

# Pixels of the canvas that differ from the plain image (the page's drawing), and a sample of the
# canvas inside the first box's outline.
_DIFF_JS = """
async () => {
  const canvas = document.getElementById("canvas");
  const file = document.getElementById("file").files[0];
  const img = new Image();
  img.src = URL.createObjectURL(file);
  await img.decode();
  const plain = document.createElement("canvas");
  plain.width = canvas.width; plain.height = canvas.height;
  const pctx = plain.getContext("2d");
  pctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  const a = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const b = pctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let changed = 0;
  for (let i = 0; i < a.length; i += 4) {
    if (a[i] !== b[i] || a[i + 1] !== b[i + 1] || a[i + 2] !== b[i + 2]) changed++;
  }
  return {changed, total: a.length / 4, width: canvas.width, height: canvas.height};
}
"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: run `bash scripts/setup-system.sh` as root")
def test_page_uploads_an_image_and_draws_detections(
    server: LiveServer, expected: Callable[[str, str], list[dict[str, Any]]]
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    name = SAME_SHAPE[0]  # 320x240
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/", timeout=30_000)
            page.set_input_files("#file", str(IMAGES / name))
            page.select_option("#endpoint", "segment")
            page.fill("#threshold", "0")
            page.click("#run")
            page.wait_for_selector('#status[data-state="done"], #status[data-state="error"]', timeout=120_000)
            status = page.text_content("#status") or ""
            assert page.get_attribute("#status", "data-state") == "done", status
            last = page.evaluate("window.gnwsLast")
            items = page.locator("#detections li").all_text_contents()
            drawn = page.evaluate(_DIFF_JS)
        finally:
            browser.close()
    want = expected(MASK_R50, name)
    assert errors == []
    assert last["model"] == MASK_R50
    assert last["detections"] == want
    assert len(items) == len(want)
    assert items[0].startswith(want[0]["category_name"])
    assert f"{len(want)} detections" in status
    assert (drawn["width"], drawn["height"]) == (320, 240)
    # boxes, label backgrounds and translucent masks change a good part of the picture
    assert drawn["changed"] > 0.05 * drawn["total"], drawn
