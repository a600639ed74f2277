"""Every case in goldens/layers, run through the pycaffe API and compared with real Caffe.

Procedure (goldens/README.md): load net + init.caffemodel, write the inputs, forward,
compare every blob and param; set the output diffs, backward, compare input and param diffs.
"""
from pathlib import Path

import numpy as np
import pytest

import caffe_compat as caffe

CASES = sorted(p for p in (Path(__file__).parent / "goldens" / "layers").iterdir() if p.is_dir())
FWD = dict(rtol=1e-4, atol=1e-5)
BWD = dict(rtol=1e-3, atol=1e-5)


def _keys(golden, prefix):
    return {k[len(prefix):]: golden[k] for k in golden.files if k.startswith(prefix)}


def _run_case(case: Path):
    phase = caffe.TRAIN if (case / "phase.txt").read_text().strip() == "TRAIN" else caffe.TEST
    net = caffe.Net(str(case / "net.prototxt"), str(case / "init.caffemodel"), phase)
    golden = np.load(case / "golden.npz")
    for name, value in _keys(golden, "in/").items():
        net.blobs[name].data[...] = value
    net.forward()
    return net, golden


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_matches_caffe(case):
    net, golden = _run_case(case)
    blobs = _keys(golden, "blob/")
    assert set(blobs) == set(net.blobs), "blob names differ from Caffe's"
    for name, expected in blobs.items():
        np.testing.assert_allclose(net.blobs[name].data.reshape(expected.shape), expected,
                                   err_msg=f"blob {name}", **FWD)
    for key, expected in _keys(golden, "param/").items():
        layer, i = key.rsplit("/", 1)
        np.testing.assert_allclose(net.params[layer][int(i)].data, expected,
                                   err_msg=f"param {key}", **FWD)


@pytest.mark.parametrize("case", [c for c in CASES if "top_diff/" in
                                  " ".join(np.load(c / "golden.npz").files)
                                  or any(k.startswith("diff/") for k in np.load(c / "golden.npz").files)],
                         ids=lambda c: c.name)
def test_backward_matches_caffe(case):
    net, golden = _run_case(case)
    for name, value in _keys(golden, "top_diff/").items():
        net.blobs[name].diff[...] = value
    net.backward()
    diffs = _keys(golden, "diff/")
    assert diffs, "case has backward keys but no input diffs"
    for name, expected in diffs.items():
        np.testing.assert_allclose(net.blobs[name].diff.reshape(expected.shape), expected,
                                   err_msg=f"diff of {name}", **BWD)
    for key, expected in _keys(golden, "param_diff/").items():
        layer, i = key.rsplit("/", 1)
        np.testing.assert_allclose(net.params[layer][int(i)].diff, expected,
                                   err_msg=f"param diff {key}", **BWD)
