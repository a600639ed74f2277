"""Landmark models end to end: ``caffe dataset --landmarks`` records, ``caffe fit`` of a net
with a heatmap branch, its bundle, and the dashboard's classify answer with the predicted
heatmaps drawn over the photo (geometry checked in closed form)."""
from __future__ import annotations

import argparse
import base64
import time

import cv2
import numpy as np
import pytest

from caffe_compat.commands import dataset as dataset_cmd, fit as fit_cmd
from caffe_compat.commands.common import CliError
from caffe_compat.dashboard import overlay
from landmark_utils import CLASSES, TINY_LANDMARK_NET, landmark_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A landmark folder and a one-epoch fit of the tiny landmark net on it."""
    root = tmp_path_factory.mktemp("landmarks")
    folder = landmark_folder(root)
    (root / "tiny.prototxt").write_text(TINY_LANDMARK_NET)
    record = fit_cmd.fit(fit_cmd.fit_args(folder, root / "run", str(root / "tiny.prototxt"),
                                          epochs=1, resize=[32, 32], threads="1",
                                          progress="never"))
    return root, folder, record


def test_dataset_records_carry_the_listed_landmarks(trained):
    from caffe_compat.data.db import open_db
    from caffe_compat.data.landmarks import read_landmarks, resize_landmarks
    from caffe_compat.formats.datum import decode_datum
    root, folder, _ = trained
    summary = dataset_cmd.read_dataset(root / "run" / "dataset")
    assert summary["landmarks"]["count"] == 8 and summary["landmarks"]["names"][0] == \
        "left_collar"
    assert not [s for s in summary["skipped"] if "list_landmarks" in s["path"]]
    listed = read_landmarks(folder / "list_landmarks.txt")
    with open_db(root / "run" / "dataset" / "val_lmdb") as db:
        for key, value in db.items():
            image, _, marks = decode_datum(value)
            name = key.decode().split("_", 1)[1]
            photo = cv2.imread(str(folder / name))
            expected = resize_landmarks(listed[name], photo.shape[:2], image.shape[1:])
            np.testing.assert_allclose(np.reshape(marks, (-1, 3)), expected, atol=1e-5)


def test_fit_bundles_the_heatmap_branch(trained):
    import caffe_compat as caffe
    from caffe_compat.data.bundle import Preprocess
    root, folder, record = trained
    assert record["status"] == "done"
    bundle = root / "run" / "bundle"
    deploy = (bundle / "deploy.prototxt").read_text()
    assert "LandmarkHeatmap" not in deploy and "EuclideanLoss" not in deploy
    spec = Preprocess.load(bundle).spec
    assert spec["heatmap_blob"] == "heatmaps" and len(spec["landmark_names"]) == 8
    classifier = caffe.Classifier.from_bundle(bundle)
    photos = sorted(str(p) for p in folder.glob("*/*.png"))[:3]
    probs, maps = classifier.probabilities_and_heatmaps(photos)
    assert maps.shape == (3, 8, 28, 28)
    np.testing.assert_allclose(probs, classifier.probabilities(photos), rtol=1e-6)
    # the same numbers from a plain pycaffe Net of the deploy files (an independent path)
    net = caffe.Net(str(bundle / "deploy.prototxt"), caffe.TEST,
                    weights=str(bundle / "weights.caffemodel"))
    blob = classifier.blob(photos[1])
    net.blobs["data"].reshape(1, *blob.shape)
    net.blobs["data"].data[...] = blob
    net.forward()
    np.testing.assert_allclose(net.blobs["heatmaps"].data[0], maps[1], rtol=1e-5, atol=1e-6)


def test_fit_refuses_a_landmark_model_on_data_without_landmarks(tmp_path):
    folder = landmark_folder(tmp_path)
    (folder / "list_landmarks.txt").unlink()
    (tmp_path / "tiny.prototxt").write_text(TINY_LANDMARK_NET)
    with pytest.raises(CliError, match="reads landmarks .*'landmarks'.* has none"):
        fit_cmd.fit(fit_cmd.fit_args(folder, tmp_path / "run", str(tmp_path / "tiny.prototxt"),
                                     epochs=1, resize=[32, 32], progress="never"))


SPEC = {"resize": [32, 32], "crop": 28, "input_shape": [1, 3, 28, 28]}


def test_landmark_points_map_back_to_the_photo():
    maps = np.zeros((2, 14, 14), np.float32)
    maps[0, 3, 5] = 4.0           # landmark 0 peaks at map pixel (x 5, y 3)
    maps[1, 10, 1] = 1.0          # landmark 1: a quarter of that peak
    points = overlay.landmark_points(maps, SPEC, (64, 96), ["a", "b"])
    # map (14) -> input (28): x' = (x + .5)*2 - .5; + crop offset 2; stored 32 -> photo
    for p, (mx, my) in zip(points, [(5, 3), (1, 10)]):
        x_stored, y_stored = (mx + 0.5) * 2 - 0.5 + 2, (my + 0.5) * 2 - 0.5 + 2
        assert p["x"] == pytest.approx((x_stored + 0.5) * 96 / 32 - 0.5, abs=0.01)
        assert p["y"] == pytest.approx((y_stored + 0.5) * 64 / 32 - 0.5, abs=0.01)
    assert [p["shown"] for p in points] == [True, False]
    assert [p["name"] for p in points] == ["a", "b"] and points[0]["peak"] == 4.0


def test_overlay_draws_the_heat_over_the_crop_and_marks_the_peak():
    photo = np.full((32, 32, 3), 128, np.uint8)
    maps = np.zeros((1, 28, 28), np.float32)
    maps[0, 20, 6] = 1.0
    points = overlay.landmark_points(maps, SPEC, photo.shape[:2], ["a"])
    png = overlay.overlay_png(photo, maps, SPEC, points)
    picture = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (256, 256, 3)                      # enlarged 8x
    assert picture[4, 4].tolist() == [70, 70, 70]              # outside the crop: darkened
    assert picture[128, 200].tolist() == [128, 128, 128]       # cold heat keeps the photo
    x, y = (round((points[0][k] + 0.5) * 8 - 0.5) for k in ("x", "y"))
    b, g, r = picture[y, x].tolist()
    assert r > 200 and b < 80                                  # landmark 0's red marker
    assert overlay.data_url(png).startswith("data:image/png;base64,")
    assert base64.b64decode(overlay.data_url(png).split(",", 1)[1]) == png


def test_build_progress_counts_records_and_extrapolates():
    from caffe_compat.commands.build_progress import BuildProgress
    now = [0.0]
    progress = BuildProgress(None, log_lines=False, clock=lambda: now[0])
    for done in range(1, 11):                 # 10 images checked, one second each
        now[0] = done
        progress("scan", done, 10)
    # 1 s an image: the scan is over, the 10 records are estimated at the scan's pace
    assert progress.state()["eta_seconds"] == pytest.approx(10)
    now[0] = 5
    progress("scan", 5, 10)                   # (as if halfway: 5 images left + 10 records)
    assert progress.state()["eta_seconds"] == pytest.approx(15)
    now[0] = 10
    progress("scan", 10, 10)
    progress("split", 8, 10)
    for done in range(1, 5):                  # records: the first at t=11, then 2 s each
        now[0] = 11 + 2 * (done - 1)
        progress("train_db", done, 8)
    state = progress.state()
    assert (state["records_done"], state["records_total"], state["images_checked"]) == (4, 10, 10)
    assert state["elapsed_seconds"] == 17
    assert state["eta_seconds"] == pytest.approx(6 / 3 * 6)   # 3 records in 6 s, 6 to go
    assert progress.state(finished=True)["stage"] == "done"


def _wait(client, path, states, seconds=300):
    deadline = time.monotonic() + seconds
    while (record := client.get(path).json())["state"] not in states:
        assert time.monotonic() < deadline, record
        time.sleep(0.3)
    return record


def test_dashboard_trains_a_landmark_model_and_draws_its_heatmaps(tmp_path):
    pytest.importorskip("fastapi", reason="the dashboard needs fastapi (pip install -e .)")
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    from fastapi.testclient import TestClient
    from caffe_compat.dashboard.app import create_app
    from caffe_compat.dashboard.settings import Settings
    data = tmp_path / "data"
    landmark_folder(data)
    plain = landmark_folder(data, name="plain")
    (plain / "list_landmarks.txt").unlink()
    settings = Settings(workdir=tmp_path / "work", data_root=data)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        assert client.post("/api/datasets", json={"folder": "plain", "landmarks": "/etc/passwd"}
                           ).status_code == 403
        marked = client.post("/api/datasets", json={"folder": "clothes", "resize": [32, 32]}
                             ).json()["id"]
        bare = client.post("/api/datasets", json={"folder": "plain", "resize": [32, 32]}
                           ).json()["id"]
        record = _wait(client, f"/api/datasets/{marked}", ("ready", "failed"))
        assert record["state"] == "ready", record["error"]
        assert record["result"]["landmarks"]["count"] == 8
        assert record["progress"]["stage"] == "done"
        assert record["progress"]["records_done"] == record["progress"]["records_total"] == 20
        assert _wait(client, f"/api/datasets/{bare}", ("ready", "failed"))["result"][
            "landmarks"] is None
        refused = client.post("/api/jobs", json={"dataset": bare, "model": "vgg16_landmark_64"})
        assert refused.status_code == 400 and "reads landmarks" in refused.json()["error"]
        job = client.post("/api/jobs", json={"dataset": marked, "prototxt": TINY_LANDMARK_NET,
                                             "epochs": 1}).json()["id"]
        record = _wait(client, f"/api/jobs/{job}", ("done", "failed", "stopped"))
        assert record["state"] == "done", record["error"]
        photo = next((data / "clothes" / CLASSES[0]).glob("*.png")).read_bytes()
        answer = client.post(f"/api/jobs/{job}/classify",
                             files=[("image", ("t.png", photo, "image/png"))]).json()
        result = answer["results"][0]
        assert {t["label"] for t in result["top"]} == set(CLASSES)
        assert [p["name"] for p in result["landmarks"]][:2] == ["left_collar", "right_collar"]
        assert all(-1 <= p["x"] <= 28 and -1 <= p["y"] <= 28 for p in result["landmarks"])
        png = base64.b64decode(result["overlay"].split(",", 1)[1])
        assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape == \
            (256, 256, 3)
        page = client.get(f"/datasets/{marked}").text
        assert 'id="landmarks"' in page and "left_collar" in page
