"""The dashboard's REST API without training: every refusal, the model pages' validation,
the metrics stream, restart recovery and the token (FastAPI's TestClient, a real SQLite)."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs fastapi (pip install -e .)")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (pip install -e .[test])")

from fastapi.testclient import TestClient  # noqa: E402

from caffe_compat.dashboard.app import create_app  # noqa: E402
from caffe_compat.dashboard.settings import Settings  # noqa: E402
from caffe_compat.dashboard.store import Store  # noqa: E402
from dashboard_utils import image_folder, png_bytes  # noqa: E402

ALEXNET = "alexnet_64"


@pytest.fixture
def env(tmp_path):
    data = tmp_path / "data"
    image_folder(data)
    settings = Settings(workdir=tmp_path / "work", data_root=data)
    with _client(settings) as client:
        yield client, settings, tmp_path


def _client(settings: Settings) -> TestClient:
    """A client addressing the app as a browser on this machine does."""
    return TestClient(create_app(settings), base_url="http://127.0.0.1:8080")


def _job_record(settings: Settings, state: str, points=()) -> int:
    """A job row with a metrics file, as a finished ``caffe fit`` leaves them."""
    store = Store(settings.database)
    ident = store.add("jobs", "recorded", state, {"model": ALEXNET, "dataset": 1, "epochs": 1,
                                                  "precision": "fp32"})
    store.close()
    metrics = settings.folder("jobs", ident) / "run" / "snapshots" / "fit.metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps(p) + "\n" for p in points))
    return ident


POINTS = [{"kind": "train", "iter": i, "loss": 1.0 / (i + 1), "smoothed_loss": 1.0 / (i + 1),
           "lr": 0.01, "seconds": 0.5, "images_per_second": 8.0, "outputs": {"loss": 0.5}}
          for i in range(4)] + [{"kind": "test", "iter": 4, "net": 0, "loss": 0.4,
                                 "seconds": 0.1, "outputs": {"accuracy": 0.75, "loss": 0.4}}]


def test_health_and_openapi_list_every_endpoint(env):
    client, settings, _ = env
    assert client.get("/api/health").json()["ok"] is True
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/health", "/api/datasets", "/api/datasets/{ident}", "/api/jobs",
                 "/api/jobs/{ident}", "/api/jobs/{ident}/metrics", "/api/jobs/{ident}/stop",
                 "/api/jobs/{ident}/classify", "/api/jobs/{ident}/stream",
                 "/api/models/validate"):
        assert path in paths, path


@pytest.mark.parametrize("folder, status", [("..", 403), ("/etc", 403), ("shapes/../..", 403),
                                            ("missing", 404), ("shapes/circle/0.png", 400),
                                            ("shapes/circle", 400), ("", 400)])
def test_dataset_folders_outside_or_unfit_are_refused(env, folder, status):
    client, _, _ = env
    response = client.post("/api/datasets", json={"folder": folder, "name": "x"})
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert client.get("/api/datasets").json() == []          # nothing recorded


def test_symlinks_out_of_the_data_root_are_refused(env):
    client, settings, tmp_path = env
    outside = image_folder(tmp_path, "outside")
    os.symlink(outside, settings.data_root / "link")
    assert client.post("/api/datasets", json={"folder": "link"}).status_code == 403
    os.symlink(tmp_path / "outside" / "circle" / "0.png",
               settings.data_root / "shapes" / "square" / "stolen.png")
    response = client.post("/api/datasets", json={"folder": "shapes"})
    assert response.status_code == 403 and "square/stolen.png" in response.json()["error"]


@pytest.mark.parametrize("body, status", [({"folder": "shapes", "resize": [4, 4]}, 400),
                                          ({"folder": "shapes", "val_percent": 100}, 400),
                                          ({"folder": "shapes", "backend": "csv"}, 400),
                                          ({"name": "no folder"}, 422)])
def test_dataset_options_are_checked(env, body, status):
    client, _, _ = env
    assert client.post("/api/datasets", json=body).status_code == status


def test_unknown_records_are_404(env):
    client, _, _ = env
    for url in ("/api/datasets/9", "/api/jobs/9", "/api/jobs/9/metrics", "/api/jobs/9/log",
                "/api/datasets/9/mean.png", "/jobs/9", "/datasets/9"):
        assert client.get(url).status_code == 404, url
    assert client.post("/api/jobs/9/stop").status_code == 404
    assert client.get("/jobs/9").text.count("no job 9") == 1       # an error page, not a trace


def test_models_are_listed_read_and_validated_with_line_numbers(env):
    client, _, _ = env
    assert ALEXNET in {m["name"] for m in client.get("/api/models").json()}
    text = client.get(f"/api/models/{ALEXNET}").json()["prototxt"]
    good = client.post("/api/models/validate", json={"prototxt": text}).json()
    assert good["ok"] and good["params"] == 710_698       # as models/alexnet_64/readme.md says
    assert {"name": "conv1", "type": "Convolution", "top": [20, 24, 29, 29],
            "params": 24 * 3 * 7 * 7 + 24, "flops": 2 * 24 * 29 * 29 * 3 * 7 * 7} in good["layers"]
    typo = text.replace("kernel_size: 7", "kernel_sise: 7")
    bad = client.post("/api/models/validate", json={"prototxt": typo}).json()
    line = typo.splitlines().index("    kernel_sise: 7") + 1
    assert not bad["ok"] and bad["errors"][0]["line"] == line
    assert bad["errors"][0]["message"].startswith(f"train_val.prototxt:{line}:5: layer 'conv1'")
    wired = text.replace('bottom: "norm1"', 'bottom: "nrm1"')
    errors = client.post("/api/models/validate", json={"prototxt": wired}).json()["errors"]
    assert "Unknown bottom blob 'nrm1'" in errors[0]["message"]
    assert errors[0]["line"] == wired.splitlines().index('  name: "pool1"') + 1


def test_python_layers_are_refused_unless_allowed(env, tmp_path):
    client, settings, _ = env
    text = 'name: "p" layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 }}}' \
           '\nlayer { name: "py" type: "Python" bottom: "x" top: "y" ' \
           'python_param { module: "os" layer: "system" } }'
    errors = client.post("/api/models/validate", json={"prototxt": text}).json()["errors"]
    assert errors[0]["line"] == 2 and "Python layers are refused" in errors[0]["message"]
    allowed = Settings(workdir=tmp_path / "w2", data_root=settings.data_root,
                       allow_python_layers=True)
    with _client(allowed) as other:
        errors = other.post("/api/models/validate", json={"prototxt": text}).json()["errors"]
        assert "refused by this dashboard" not in errors[0]["message"]     # the class check


def test_drawing_is_svg_and_oversized_prototxt_is_refused(env):
    client, settings, _ = env
    text = client.get(f"/api/models/{ALEXNET}").json()["prototxt"]
    svg = client.post("/api/models/draw", json={"prototxt": text})
    assert svg.status_code == 200 and b"<svg" in svg.content and b"conv1" in svg.content
    assert client.post("/api/models/draw", json={"prototxt": "layer {"}).status_code == 400
    huge = "#" * (settings.max_prototxt_bytes + 1)
    assert client.post("/api/models/validate", json={"prototxt": huge}).status_code == 413


def test_job_requests_are_checked(env):
    client, settings, _ = env
    assert client.post("/api/jobs", json={"dataset": 1, "model": ALEXNET}).status_code == 404
    store = Store(settings.database)
    building = store.add("datasets", "b", "running", {})
    ready = store.add("datasets", "r", "ready", {})
    store.close()
    assert client.post("/api/jobs", json={"dataset": building, "model": ALEXNET}
                       ).status_code == 409
    for body in ({"model": "nonet"}, {"model": ALEXNET, "epochs": 0},
                 {"model": ALEXNET, "precision": "int4"}, {"prototxt": "layer {"},
                 {"model": ALEXNET, "weights": "job:99"}):
        response = client.post("/api/jobs", json={"dataset": ready, **body})
        assert response.status_code in (400, 404), (body, response.text)
    assert client.get("/api/jobs").json() == []


def test_metrics_stream_and_progress_of_a_recorded_job(env):
    client, settings, _ = env
    ident = _job_record(settings, "done", POINTS)
    assert client.get(f"/api/jobs/{ident}/metrics").json() == POINTS
    record = client.get(f"/api/jobs/{ident}").json()
    assert record["state"] == "done" and record["progress"]["iter"] == 3
    assert record["progress"]["images_per_second"] == 8.0
    with client.stream("GET", f"/api/jobs/{ident}/stream") as stream:
        text = "".join(stream.iter_text())
    metric_lines = [l for l in text.splitlines() if l.startswith("data: {\"kind\"")]
    assert [json.loads(l[6:]) for l in metric_lines] == POINTS
    assert "event: end" in text
    page = client.get(f"/jobs/{ident}").text
    assert "chart-loss" in page and "/static/chart.js" in page


def test_stop_resume_and_classify_refusals(env):
    client, settings, _ = env
    ident = _job_record(settings, "done", POINTS)
    assert client.post(f"/api/jobs/{ident}/stop").status_code == 409
    assert client.post(f"/api/jobs/{ident}/resume").status_code == 409
    upload = {"image": ("a.png", png_bytes(), "image/png")}
    assert client.post(f"/api/jobs/{ident}/classify", files=upload).status_code == 409
    not_image = {"image": ("a.png", b"plain text, not an image", "image/png")}
    assert client.post(f"/api/jobs/{ident}/classify", files=not_image).status_code == 400
    big = {"image": ("a.png", b"\x89PNG" + b"0" * settings.max_upload_bytes, "image/png")}
    assert client.post(f"/api/jobs/{ident}/classify", files=big).status_code == 413
    assert client.post(f"/api/jobs/{ident}/classify").status_code == 422
    no_model = client.get(f"/api/jobs/{ident}/bundle.zip")
    assert no_model.status_code == 409 and "no trained weights" in no_model.json()["error"]


def test_a_restart_marks_running_work_interrupted(tmp_path):
    settings = Settings(workdir=tmp_path / "work", data_root=tmp_path)
    settings.workdir.mkdir()
    store = Store(settings.database)
    job = store.add("jobs", "j", "running", {"model": ALEXNET, "dataset": 1, "epochs": 1,
                                             "precision": "fp32"})
    building = store.add("datasets", "d", "running", {})
    store.close()
    with _client(settings) as client:
        record = client.get(f"/api/jobs/{job}").json()
        assert record["state"] == "interrupted" and "stopped" in record["error"]
        assert client.get(f"/api/datasets/{building}").json()["state"] == "failed"


def test_other_hosts_need_the_token(tmp_path):
    settings = Settings(workdir=tmp_path / "w", data_root=tmp_path, host="0.0.0.0")
    assert settings.token                                      # generated
    with _client(settings) as client:
        assert client.get("/api/health").status_code == 401
        assert client.get("/").status_code == 401
        assert client.get("/api/health", headers={"Authorization": "Bearer wrong"}
                          ).status_code == 401
        assert client.get("/api/health", headers={"Authorization": f"Bearer {settings.token}"}
                          ).status_code == 200
        page = client.get(f"/?token={settings.token}")
        assert page.status_code == 200
        assert client.get("/api/health").status_code == 200          # the cookie it set


def test_uploaded_weights_are_kept_under_the_workdir_and_named_by_id(env):
    client, settings, _ = env
    answer = client.post("/api/uploads", files={"file": ("../../evil.caffemodel", b"\x0a\x00",
                                                         "application/octet-stream")}).json()
    stored = settings.workdir / "uploads" / answer["id"]
    assert stored.read_bytes() == b"\x0a\x00" and answer["bytes"] == 2
    assert list((settings.workdir / "uploads").iterdir()) == [stored]   # not the given name
    store = Store(settings.database)
    ready = store.add("datasets", "r", "ready", {})
    store.close()
    for weights in ("../dashboard.sqlite", "nothere.caffemodel", "job:77"):
        response = client.post("/api/jobs", json={"dataset": ready, "model": ALEXNET,
                                                  "weights": weights})
        assert response.status_code == 404, weights
    assert client.post("/api/jobs", json={"dataset": ready, "model": ALEXNET,
                                          "weights": "job:x"}).status_code == 400


def test_solver_fields_give_the_job_its_own_model_files(env):
    client, settings, _ = env
    store = Store(settings.database)
    ready = store.add("datasets", "r", "ready", {})
    store.close()
    for solver in ({"type": "Adamm"}, {"momentum": "fast"}, {"lr_policy": "step"},
                   {"regularization_type": "L3"}):
        response = client.post("/api/jobs", json={"dataset": ready, "model": ALEXNET,
                                                  "solver": solver})
        assert response.status_code == 400 and response.json()["error"], solver
    job = client.post("/api/jobs", json={"dataset": ready, "model": ALEXNET, "epochs": 1,
                                         "solver": {"type": "Adam", "base_lr": "0.001"},
                                         "batch_size": 8}).json()["id"]
    client.post(f"/api/jobs/{job}/stop")
    folder = settings.folder("jobs", job)
    solver = (folder / "solver.prototxt").read_text()
    assert 'type: "Adam"' in solver and "base_lr: 0.001" in solver
    assert "momentum: 0.9" in solver                        # the rest is alexnet_64's
    library = settings.models_dir / ALEXNET / "train_val.prototxt"
    assert (folder / "train_val.prototxt").read_text() == library.read_text()


def _write_db(path, labels, landmarks: int = 0):
    import numpy as np
    from caffe_compat.data.db import DBWriter
    from caffe_compat.formats.blob_io import array_to_datum
    with DBWriter(path, "lmdb") as db:
        for i, label in enumerate(labels):
            datum = array_to_datum(np.full((3, 12, 10), i, np.uint8), label)
            datum.float_data.extend([1.0, 2.0, 1.0] * landmarks)   # convert_imageset --landmarks
            db.put(f"{i:08d}", datum.SerializeToString())


def test_existing_databases_are_imported_with_their_counts(env):
    import numpy as np
    from caffe_compat.formats.blob_io import write_blobproto
    client, settings, tmp_path = env
    root = settings.data_root / "dbs"
    root.mkdir()
    _write_db(root / "train_lmdb", [0, 1, 1, 2])
    _write_db(root / "val_lmdb", [2, 0])
    write_blobproto(root / "mean.binaryproto", np.full((1, 3, 12, 10), 100, np.float32))
    (root / "labels.txt").write_text("a\nb\nc\n")
    body = {"train_db": "dbs/train_lmdb", "val_db": "dbs/val_lmdb",
            "mean": "dbs/mean.binaryproto", "labels": "dbs/labels.txt", "name": "old"}
    ident = client.post("/api/datasets/import", json=body).json()["id"]
    record = client.get(f"/api/datasets/{ident}").json()
    assert record["state"] == "ready" and record["result"]["resize"] == [12, 10]
    assert record["result"]["counts"] == {"a": {"train": 1, "val": 1},
                                          "b": {"train": 2, "val": 0},
                                          "c": {"train": 1, "val": 1}}
    assert client.get(f"/api/datasets/{ident}/mean.png").content[:4] == b"\x89PNG"
    assert "dbs/train_lmdb" in client.get(f"/datasets/{ident}").text
    assert record["result"]["landmarks"] is None
    _write_db(root / "marked_train", [0, 1], landmarks=8)
    _write_db(root / "marked_val", [1, 0], landmarks=8)
    marked = client.post("/api/datasets/import", json={
        **body, "train_db": "dbs/marked_train", "val_db": "dbs/marked_val"}).json()["id"]
    landmarks = client.get(f"/api/datasets/{marked}").json()["result"]["landmarks"]
    assert landmarks["count"] == 8 and landmarks["names"][-1] == "right_hem"
    (root / "two.txt").write_text("a\nb\n")
    for change, status in (({"train_db": "/tmp"}, 403), ({"labels": "dbs/two.txt"}, 400),
                           ({"mean": "dbs/none"}, 404), ({"val_db": "dbs/labels.txt"}, 400)):
        response = client.post("/api/datasets/import", json={**body, **change})
        assert response.status_code == status, (change, response.text)


def test_protocol_summary_is_mean_and_sample_std():
    from caffe_compat.dashboard.protocols import summary
    result = summary([0.5, 0.7, 0.9])
    assert result["n"] == 3 and result["mean"] == pytest.approx(0.7)
    assert result["std"] == pytest.approx(0.2)             # sqrt(((0.2)^2 * 2) / 2)
    assert result["text"] == "70.00 ± 20.00 %"
    one = summary([0.25])                                  # while the other runs train
    assert one["std"] is None and one["text"] == "25.00 % (one run so far)"


def test_protocol_requests_are_checked_before_anything_is_built(env):
    client, _, _ = env
    for body in ({"folder": "shapes", "model": ALEXNET, "runs": 1},
                 {"folder": "shapes", "model": "nonet"},
                 {"folder": "shapes", "model": ALEXNET, "epochs": 0},
                 {"folder": "/etc", "model": ALEXNET},
                 {"folder": "shapes", "model": ALEXNET, "per_class": "forty"}):
        response = client.post("/api/protocols", json=body)
        assert 400 <= response.status_code < 500, body
    assert client.get("/api/datasets").json() == [] and client.get("/api/jobs").json() == []
    assert client.get("/api/protocols/3").status_code == 404


def test_other_sites_and_rebound_names_are_refused(env):
    client, _, _ = env
    assert client.get("/api/health", headers={"Host": "evil.example:8080"}).status_code == 403
    cross = client.post("/api/uploads", headers={"Origin": "http://evil.example"},
                        files={"file": ("w.caffemodel", b"x", "application/octet-stream")})
    assert cross.status_code == 403 and "another site" in cross.json()["error"]
    same = client.post("/api/uploads", headers={"Origin": "http://127.0.0.1:8080"},
                       files={"file": ("w.caffemodel", b"x", "application/octet-stream")})
    assert same.status_code == 201


def test_workers_left_by_a_killed_server_are_stopped_at_the_next_start(tmp_path):
    import subprocess
    import time
    from caffe_compat.dashboard.launch import free_port
    from caffe_compat.dashboard.workers import CAFFE, child_env, is_our_worker
    settings = Settings(workdir=tmp_path / "work", data_root=tmp_path)
    settings.workdir.mkdir()
    # a long-running `caffe` child in its own session, as a killed server leaves its workers
    orphan = subprocess.Popen(CAFFE + ["dashboard", "--port", str(free_port()), "--workdir",
                                       str(tmp_path / "other"), "--data-root", str(tmp_path)],
                              env=child_env(settings), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (tmp_path / "other" / "dashboard.sqlite").exists():   # up and serving
        assert orphan.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    assert is_our_worker(orphan.pid)
    store = Store(settings.database)
    job = store.add("jobs", "j", "running", {"model": ALEXNET, "dataset": 1, "epochs": 1,
                                             "precision": "fp32"})
    store.update("jobs", job, pid=orphan.pid)
    store.close()
    try:
        with _client(settings) as client:
            # asked to stop and gone: its /proc entry empties during exit, a moment before
            # it can be reaped, so wait for that moment instead of polling once
            orphan.wait(timeout=10)
            assert client.get(f"/api/jobs/{job}").json()["state"] == "interrupted"
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


def test_lists_carry_the_progress_of_running_work(env):
    client, settings, _ = env
    running = _job_record(settings, "running", POINTS)
    done = _job_record(settings, "done", POINTS)
    rows = {j["id"]: j for j in client.get("/api/jobs").json()}
    assert rows[running]["progress"]["iter"] == 3
    assert rows[running]["progress"]["images_per_second"] == pytest.approx(8.0)
    assert "progress" not in rows[done]                    # finished rows stay light
    page = client.get("/").text
    assert f'<tr data-id="{running}">' in page and 'data-role="progress"' in page


def test_protocol_table_by_epoch_is_mean_and_std_of_each_epochs_test(env):
    from caffe_compat.dashboard.protocols import by_epoch
    _, settings, _ = env
    jobs = []
    for accuracies in ([0.5, 0.7, 0.9, 0.8], [0.3, 0.5, 0.7]):      # the second stopped early
        points = [{"kind": "test", "iter": 0, "net": 0, "outputs": {"accuracy": 0.1}}]
        points += [{"kind": "test", "iter": 2 * (e + 1), "net": 0, "outputs": {"accuracy": a}}
                   for e, a in enumerate(accuracies)]
        jobs.append(_job_record(settings, "done", points))
        (settings.folder("jobs", jobs[-1]) / "run" / "solver.prototxt").write_text(
            "test_interval: 2\nmax_iter: 8\n")
    table = by_epoch(settings, jobs, epochs=4, rows=2)
    assert [row["epoch"] for row in table] == [2, 4]
    assert table[0]["mean"] == pytest.approx(0.6) and table[0]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert table[1]["n"] == 1 and table[1]["mean"] == pytest.approx(0.8)


def test_a_landmark_protocol_on_a_folder_without_landmarks_builds_nothing(env):
    client, settings, _ = env
    refused = client.post("/api/protocols", json={"folder": "shapes", "runs": 2,
                                                  "model": "vgg16_landmark_64"})
    assert refused.status_code == 400 and "reads landmarks" in refused.json()["error"]
    assert client.get("/api/datasets").json() == []


def test_a_fine_tuning_library_model_needs_its_pretrained_weights(env, tmp_path):
    import shutil
    client, settings, _ = env
    store = Store(settings.database)
    ready = store.add("datasets", "r", "ready", {})
    store.close()
    models = tmp_path / "lib" / "models"
    shutil.copytree(settings.models_dir / "alexnet_64_finetune", models / "alexnet_64_finetune")
    settings.models_dir = models
    refused = client.post("/api/jobs", json={"dataset": ready, "model": "alexnet_64_finetune"})
    assert refused.status_code == 400 and "alexnet_64_pretrained.caffemodel" in \
        refused.json()["error"] and "does not exist" in refused.json()["error"]
    pretrained = tmp_path / "lib" / "runs/pretrain/alexnet_64/alexnet_64_pretrained.caffemodel"
    pretrained.parent.mkdir(parents=True)
    pretrained.write_bytes(b"")
    job = client.post("/api/jobs", json={"dataset": ready, "model": "alexnet_64_finetune"})
    assert job.status_code == 201
    record = client.get(f"/api/jobs/{job.json()['id']}").json()
    assert record["options"]["weights"] == str(pretrained.resolve())
    client.post(f"/api/jobs/{job.json()['id']}/stop")
