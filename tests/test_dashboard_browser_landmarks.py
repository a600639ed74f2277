"""A landmark model in a real headless Chromium: a data set built from a folder with a
list_landmarks.txt says its records carry landmarks, a job trains the tiny landmark net, and
classifying a photo on the job page shows the predicted heatmaps over it; a data set page
follows a build's progress live. Screenshots go to $DASHBOARD_SCREENSHOTS (default: the
test's temporary folder)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs fastapi (pip install -e .)")
pytest.importorskip("httpx", reason="the tests talk HTTP with httpx (pip install -e .[test])")
from caffe_compat.dashboard.launch import (DashboardProcess, chromium_missing,  # noqa: E402
                                           headless_chromium)

if chromium_missing():
    pytest.skip(f"browser tests skipped: {chromium_missing()}", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from landmark_utils import CLASSES, TINY_LANDMARK_NET, landmark_folder  # noqa: E402


def _wait(driver, condition, seconds: float = 300):
    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)


def test_classify_draws_the_landmark_heatmaps_over_the_photo(tmp_path):
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    folder = landmark_folder(tmp_path / "data")
    browser = headless_chromium()
    try:
        with DashboardProcess(tmp_path / "work", tmp_path / "data") as server:
            browser.get(server.url + "/")
            form = browser.find_element(By.ID, "new-dataset")
            form.find_element(By.NAME, "folder").send_keys("clothes")
            for name in ("height", "width"):
                form.find_element(By.NAME, name).clear()
                form.find_element(By.NAME, name).send_keys("32")
            form.find_element(By.CSS_SELECTOR, "button").click()
            _wait(browser, lambda d: d.find_elements(By.ID, "counts"))
            note = browser.find_element(By.ID, "landmarks").text
            assert "8 landmarks" in note and "left_collar" in note
            browser.save_screenshot(str(shots / "dataset_landmarks.png"))
            dataset = int(browser.current_url.rstrip("/").rsplit("/", 1)[1])
            _building_page_follows_the_status(browser, server, tmp_path / "work", shots)
            job = server.call("POST", "/api/jobs", {"dataset": dataset, "epochs": 2,
                                                    "prototxt": TINY_LANDMARK_NET})["id"]
            browser.get(f"{server.url}/jobs/{job}")
            _wait(browser, lambda d: d.find_element(By.ID, "state").text in ("done", "failed"))
            assert browser.find_element(By.ID, "state").text == "done", \
                browser.find_element(By.ID, "error").text
            # the landmark loss is an auxiliary output: on its own chart, not the loss chart
            legend = browser.find_element(By.CSS_SELECTOR, "#chart-aux").text
            assert "landmark_loss" in legend
            assert "landmark_loss" not in browser.find_element(By.ID, "chart-loss").text
            photo = sorted((folder / CLASSES[1]).glob("*.png"))[0]
            browser.find_element(By.CSS_SELECTOR, "#classify input[type=file]"
                                 ).send_keys(str(photo))
            browser.find_element(By.CSS_SELECTOR, "#classify button").click()
            picture = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR,
                                                               ".landmarks img"))[0]
            _wait(browser, lambda d: d.execute_script("return arguments[0].naturalWidth",
                                                      picture) == 256)
            caption = browser.find_element(By.CSS_SELECTOR, ".landmarks figcaption").text
            assert caption and caption != "no landmark stands out"
            browser.execute_script("document.getElementById('classify').scrollIntoView()")
            browser.save_screenshot(str(shots / "classify_landmarks.png"))
    finally:
        browser.quit()


def _building_page_follows_the_status(browser, server, work: Path, shots: Path) -> None:
    """A build in progress (its record and its ``caffe dataset --status`` file, written as
    the worker does) shows records done / total and the ETA, and the page moves on by itself
    when the build is over."""
    import json

    from caffe_compat.dashboard.store import Store
    store = Store(work / "dashboard.sqlite")
    ident = store.add("datasets", "building", "running", {"folder": "x", "resize": [32, 32],
                                                          "val_percent": 20, "seed": 0})
    status = work / "datasets" / str(ident) / "status.json"
    status.parent.mkdir(parents=True)
    state = {"stage": "train_db", "stage_done": 3, "stage_total": 8, "images_checked": 10,
             "images_total": 10, "records_done": 3, "records_total": 10,
             "elapsed_seconds": 4.0, "eta_seconds": 65.0}
    status.write_text(json.dumps(state))
    try:
        browser.get(f"{server.url}/datasets/{ident}")
        text = _wait(browser, lambda d: "records" in d.find_element(By.ID, "build-progress").text
                     and d.find_element(By.ID, "build-progress").text)
        assert text == "3 / 10 records · ETA 1 min 5 s"
        width = browser.execute_script("return document.getElementById('build-bar').style.width")
        assert width == "65%"                              # (10 checked + 3 written) / 20
        status.write_text(json.dumps(dict(state, records_done=7, stage_done=7)))
        _wait(browser, lambda d: d.find_element(By.ID, "build-progress").text.startswith("7 / 10"))
        browser.save_screenshot(str(shots / "dataset_building.png"))
        store.update("datasets", ident, state="failed", error="stopped by the test")
        _wait(browser, lambda d: d.find_elements(By.ID, "error"))      # reloaded when over
    finally:
        store.close()
