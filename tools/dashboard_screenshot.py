#!/usr/bin/env python3
"""The README's picture of the dashboard: a job page with live curves, taken in headless
Chromium while ``caffe dashboard`` trains alexnet_64 on data/fashion50.

    python tools/dashboard_screenshot.py [--out docs/dashboard_job.png] [--epochs 12]
                                         [--tests 4] [--folder fashion50] [--model alexnet_64]
    python tools/dashboard_screenshot.py --model vgg16_landmark_64 --epochs 20 \
        --classify-out docs/dashboard_landmarks.png [--photos 3]

Starts the real server on a free loopback port with ``data/`` as its data root and a
temporary workdir, builds the data set, starts the job, waits until ``--tests`` test passes
are on the curves, saves the screenshot, then stops the server with SIGINT. With
``--classify-out`` it waits for the job to finish instead, classifies ``--photos`` validation
photos of different classes on the job page and saves the Classify card (for a landmark
model: the predicted heatmaps over each photo).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.dashboard.launch import (DashboardProcess, chromium_missing,  # noqa: E402
                                           headless_chromium)

ROOT = Path(__file__).resolve().parents[1]


def _crop(path: str, bottom: int) -> None:
    """Keep the page down to the first row of charts (the header, state, curves)."""
    import cv2
    from caffe_compat.formats.atomic import write_bytes
    image = cv2.imread(path)
    write_bytes(path, cv2.imencode(".png", image[:bottom], [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]
                .tobytes())


def _photos(data: Path, count: int) -> list[str]:
    """The first validation photo of ``count`` different classes (held out of training)."""
    summary = json.loads((data / "dataset.json").read_text())
    seen, picks = set(), []
    for line in (data / summary["files"]["val_list"]).read_text().splitlines():
        path, label = line.rsplit(" ", 1)
        if label not in seen:
            seen.add(label)
            picks.append(str(Path(summary["folder"]) / path))
    return picks[:count]


def _classify_card(server, job: int, photos: list[str], out: str) -> int:
    from selenium.webdriver.common.by import By
    browser = headless_chromium(1200, 2400)        # tall: the card must be in view whole
    try:
        browser.get(f"{server.url}/jobs/{job}")
        browser.find_element(By.CSS_SELECTOR, "#classify input[type=file]"
                             ).send_keys("\n".join(photos))
        browser.find_element(By.CSS_SELECTOR, "#classify button").click()
        for _ in range(300):
            if browser.find_elements(By.CSS_SELECTOR, "#predictions table"):
                break
            time.sleep(0.2)
        time.sleep(1)                          # the overlay images decode
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        card = browser.find_element(By.ID, "classify")
        browser.execute_script("arguments[0].scrollIntoView()", card)
        card.screenshot(out)
    finally:
        browser.quit()
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "dashboard_job.png"))
    ap.add_argument("--folder", default="fashion50", help="a class folder under data/")
    ap.add_argument("--model", default="alexnet_64")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--tests", type=int, default=4,
                    help="take the picture once this many test passes are drawn")
    ap.add_argument("--classify-out", help="after training, classify photos and save the "
                                           "Classify card here (the job page is not taken)")
    ap.add_argument("--photos", type=int, default=3, help="validation photos to classify")
    args = ap.parse_args(argv)
    missing = chromium_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as work, \
            DashboardProcess(Path(work), ROOT / "data") as server:
        dataset = server.call("POST", "/api/datasets", {"folder": args.folder})["id"]
        record = server.wait_state("datasets", dataset, ("ready", "failed"))
        if record["state"] != "ready":
            print(f"error: the data set failed: {record['error']}", file=sys.stderr)
            return 1
        job = server.call("POST", "/api/jobs", {"dataset": dataset, "model": args.model,
                                                "epochs": args.epochs})["id"]
        if args.classify_out:
            done = server.wait_state("jobs", job, ("done", "failed", "stopped"), 7200)
            if done["state"] != "done":
                print(f"error: the job {done['state']}: {done['error']}", file=sys.stderr)
                return 1
            photos = _photos(Path(work) / "datasets" / str(dataset) / "data", args.photos)
            return _classify_card(server, job, photos, args.classify_out)
        while sum(p["kind"] == "test" for p in server.call("GET", f"/api/jobs/{job}/metrics")
                  ) < args.tests:
            if server.call("GET", f"/api/jobs/{job}")["state"] not in ("queued", "running"):
                break
            time.sleep(1)
        browser = headless_chromium(1200, 900)
        try:
            browser.get(f"{server.url}/jobs/{job}")
            time.sleep(3)                     # the stream replays the curves; let it draw
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(args.out)
            bottom = browser.execute_script(
                "const r = document.getElementById('chart-loss').getBoundingClientRect();"
                "return Math.ceil(r.bottom * window.devicePixelRatio) + 12;")
            _crop(args.out, bottom)
        finally:
            browser.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
