"""Caffe's ten-crop test of a full Fashion-MNIST run (tools/oversample_report.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_tools_full_fashion_mnist import N_TEST, fake_idx, run_tool  # noqa: F401
from tool_utils import load_tool

SOLVER = "models/vgg16_landmark_32_bn/solver_full.prototxt"


@pytest.fixture(scope="module")
def finished_run(fake_idx, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("run")
    from experiments.full_fashion_mnist import REPO
    assert run_tool(fake_idx, tmp, "--size", "36", "--solver", str(REPO / SOLVER),
                    "--max-iter", "6", "--test-every", "0") == 0
    return tmp


def test_centre_crop_equals_the_data_layer_test_and_crops_are_pycaffes(finished_run):
    from caffe_compat.formats.blob_io import read_blobproto
    from experiments.reproduce import oversample
    import caffe_compat as caffe
    result = json.loads((finished_run / "report.json").read_text())
    model = result["snapshot_check"]["model"]
    deploy = str(finished_run / "work" / "deploy.prototxt")
    mean = read_blobproto(finished_run / "db" / "mean.binaryproto")[0]
    images, labels = oversample.read_records(finished_run / "db" / "test", mean, 1 / 128)
    assert images.shape == (N_TEST, 36, 36, 1) and list(labels) == list(np.arange(N_TEST) % 10)
    p = oversample.probabilities(deploy, model, images, 32, batch=7)
    assert p.shape == (N_TEST, 10, 10)
    # independent crops: slices of the transformed records, one image at a time
    net = caffe.Net(deploy, model, caffe.TEST)
    for k, (y, x) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]):
        for mirrored in (False, True):
            crop = images[:, y:y + 32, x:x + 32, :].transpose(0, 3, 1, 2)
            crop = crop[..., ::-1] if mirrored else crop
            net.blobs["data"].reshape(*crop.shape)
            net.blobs["data"].data[...] = crop
            want = net.forward()[net.outputs[-1]].reshape(N_TEST, -1)
            np.testing.assert_allclose(p[:, k + 5 * mirrored], want, rtol=1e-5, atol=1e-6)
    # the centre crop is what the run's Data-layer test (reloaded, float32) scored
    centre = float((p[:, 4].argmax(1) == labels).mean())
    assert centre == pytest.approx(result["snapshot_check"]["accuracy"], abs=1e-6)


def test_report_gains_the_ten_crop_row_and_keeps_its_headline(finished_run, capsys):
    report = finished_run / "report.json"
    before = json.loads(report.read_text())
    assert load_tool("oversample_report").main([str(report), "--threads", "1"]) == 0
    after = json.loads(report.read_text())
    check = after.pop("oversample")
    assert after == before                           # nothing else in the record changes
    assert check["images"] == N_TEST and check["crop"] == 32
    assert check["centre"] == pytest.approx(before["snapshot_check"]["accuracy"], abs=1e-6)
    for key in ("centre", "centre_mirror", "ten_crop"):
        assert round(check[key] * N_TEST) == pytest.approx(check[key] * N_TEST, abs=1e-6)
    text = report.with_suffix(".md").read_text()
    assert "ten-crop test" in text and f"**{check['ten_crop'] * 100:.2f}%**" in text
    assert f"**test accuracy** ({N_TEST} test images) | **" \
        f"{before['test']['accuracy'] * 100:.2f}%**" in text
    assert "Scored as classify.py scores images" in text
    assert "wrote" in capsys.readouterr().out


def test_a_report_whose_caffemodel_is_gone_says_so(finished_run, tmp_path):
    result = json.loads((finished_run / "report.json").read_text())
    result["snapshot_check"]["model"] = str(tmp_path / "gone.caffemodel")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    with pytest.raises(SystemExit, match="gone.caffemodel: the run's model is missing"):
        load_tool("oversample_report").main([str(path)])
