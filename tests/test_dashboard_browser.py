"""The dashboard in a real headless Chromium (Selenium + Debian's chromium-driver): create a
data set from the form, start a job, watch its live curve grow from the metrics stream,
classify an uploaded image, and see the model editor flag a typo by line. Screenshots of each
page go to $DASHBOARD_SCREENSHOTS (default: the test's temporary folder)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs fastapi (pip install -e .)")
pytest.importorskip("httpx", reason="the tests talk HTTP with httpx (pip install -e .[test])")
from caffe_compat.dashboard.launch import (DashboardProcess, chromium_missing,  # noqa: E402
                                           headless_chromium)

if chromium_missing():
    pytest.skip(f"browser tests skipped: {chromium_missing()}", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from caffe_compat.commands.caffe_main import COMMANDS  # noqa: E402
from dashboard_utils import draw, image_folder  # noqa: E402

@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    image_folder(root / "data", per_class=10)
    running = DashboardProcess(root / "work", root / "data")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(driver, condition, seconds: float = 120):
    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)


def _points(driver, chart: str) -> int:
    svg = driver.find_elements(By.CSS_SELECTOR, f"#{chart} svg")
    return int(svg[0].get_attribute("data-points") or 0) if svg else 0


def test_model_editor_validates_as_you_type(browser, server, shots):
    browser.get(server.url + "/models?name=alexnet_64")
    _wait(browser, lambda d: "valid" in d.find_element(By.ID, "summary").text)
    assert "710,698 parameters" in browser.find_element(By.ID, "summary").text
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#svg svg"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#layers tbody tr")) > 20
    browser.save_screenshot(str(shots / "models.png"))
    editor = browser.find_element(By.ID, "prototxt")
    text = editor.get_attribute("value")
    line = text.splitlines().index("    kernel_size: 7") + 1
    browser.execute_script("arguments[0].value = arguments[0].value.replace("
                           "'kernel_size: 7', 'kernel_sise: 7');"
                           "arguments[0].dispatchEvent(new Event('input'));", editor)
    problem = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#problems li"))[0]
    assert problem.text.startswith(f"line {line}: train_val.prototxt:{line}:5: layer 'conv1'")
    assert browser.find_element(By.CSS_SELECTOR, "#gutter b").get_attribute("textContent") == \
        str(line)
    browser.save_screenshot(str(shots / "models_error.png"))


@pytest.mark.skipif("fit" not in COMMANDS, reason="training runs caffe dataset / caffe fit "
                                                  "(issue 24), not in this tree yet")
def test_dataset_job_live_curve_and_classify(browser, server, shots, tmp_path):
    browser.get(server.url + "/")
    form = browser.find_element(By.ID, "new-dataset")
    form.find_element(By.NAME, "folder").send_keys("../outside")
    form.find_element(By.CSS_SELECTOR, "button").click()
    error = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR,
                                                    "#new-dataset .error").text)
    assert "outside" in error and "refused" in error
    folder = form.find_element(By.NAME, "folder")
    folder.clear()
    folder.send_keys("shapes")
    form.find_element(By.CSS_SELECTOR, "button").click()
    _wait(browser, lambda d: "/datasets/" in d.current_url)
    _wait(browser, lambda d: d.find_elements(By.ID, "counts"))       # reloaded when ready
    assert browser.find_element(By.ID, "state").text == "ready"
    _wait(browser, lambda d: d.execute_script(
        "return document.getElementById('samples').naturalWidth") > 0)
    browser.save_screenshot(str(shots / "dataset.png"))

    browser.get(server.url + "/")
    Select(browser.find_element(By.NAME, "model")).select_by_value("alexnet_64")
    epochs = browser.find_element(By.NAME, "epochs")
    epochs.clear()
    epochs.send_keys("3")
    browser.find_element(By.CSS_SELECTOR, "#new-job button").click()
    _wait(browser, lambda d: "/jobs/" in d.current_url)
    first = _wait(browser, lambda d: _points(d, "chart-loss"))
    _wait(browser, lambda d: _points(d, "chart-loss") > first)        # pushed, no reload
    assert "iteration" in browser.find_element(By.ID, "progress").text
    browser.save_screenshot(str(shots / "job_running.png"))
    _wait(browser, lambda d: d.find_element(By.ID, "state").text in ("done", "failed"), 300)
    assert browser.find_element(By.ID, "state").text == "done", \
        browser.find_element(By.ID, "error").text
    _wait(browser, lambda d: _points(d, "chart-accuracy") > 0)
    # the noisy per-iteration loss has its mean over the last epoch beside it
    _wait(browser, lambda d: "train, epoch mean" in d.find_element(By.ID, "chart-loss").text)
    assert "validation accuracy" in browser.find_element(By.ID, "progress").text
    import cv2
    image = tmp_path / "circle.png"
    cv2.imwrite(str(image), draw("circle", 4242))
    browser.find_element(By.CSS_SELECTOR, "#classify input[type=file]").send_keys(str(image))
    browser.find_element(By.CSS_SELECTOR, "#classify button").click()
    rows = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".predictions tr"))
    labels = {row.find_elements(By.TAG_NAME, "td")[0].text for row in rows}
    assert labels == {"circle", "square"}
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    browser.save_screenshot(str(shots / "job.png"))
    job_id = browser.current_url.rstrip("/").rsplit("/", 1)[1]
    browser.get(server.url + f"/compare?jobs={job_id}")
    _wait(browser, lambda d: _points(d, "chart-loss") > 0)
    browser.save_screenshot(str(shots / "compare.png"))
    browser.get(server.url + "/")
    browser.save_screenshot(str(shots / "home.png"))
    # the models page trains a library model as it is (its own solver and pretraining)
    browser.get(server.url + "/models?name=alexnet_64")
    _wait(browser, lambda d: "valid" in d.find_element(By.ID, "summary").text)
    browser.find_element(By.CSS_SELECTOR, "#train-this button").click()
    _wait(browser, lambda d: "/jobs/" in d.current_url)
    assert browser.find_element(By.TAG_NAME, "h1").text.endswith("alexnet_64 on shapes")
    server.call("POST", "/api/jobs/" + browser.current_url.rstrip("/").rsplit("/", 1)[1] +
                "/stop")
