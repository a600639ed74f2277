"""caffe.Classifier / caffe.Detector on a tiny deploy net whose output is known in closed
form (global average of each channel -> softmax), and pycaffe's namespace through
``import caffe`` (every name, submodule aliases, Timer, NCCL, log)."""
import numpy as np
import pytest

import caffe


DEPLOY = """input: 'data' input_shape { dim: 4 dim: 3 dim: 6 dim: 6 }
layer { name: 'gap' type: 'Pooling' bottom: 'data' top: 'gap' pooling_param { pool: AVE global_pooling: true } }
layer { name: 'prob' type: 'Softmax' bottom: 'gap' top: 'prob' }
"""


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture
def deploy(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY)
    return str(path)


def test_classifier_center_and_oversample(deploy):
    clf = caffe.Classifier(deploy, None, image_dims=(8, 8), raw_scale=255,
                           mean=np.array([1.0, 2.0, 3.0]), channel_swap=(2, 1, 0))
    rng = np.random.RandomState(0)
    images = [rng.rand(8, 8, 3).astype(np.float32) for _ in range(5)]      # 5 > batch 4
    center = clf.predict(images, oversample=False)
    assert center.shape == (5, 3, 1, 1)
    center = center.reshape(5, 3)
    crops = np.array([im[1:7, 1:7] for im in images])
    gap = (crops[..., ::-1] * 255).mean((1, 2)) - [1.0, 2.0, 3.0]
    np.testing.assert_allclose(center, _softmax(gap), rtol=1e-4)
    over = clf.predict(images)
    assert over.shape == (5, 3)                  # the 10 crops' (3, 1, 1) averaged flat
    ten = caffe.io.oversample(images, (6, 6))
    gaps = (ten[..., ::-1] * 255).mean((1, 2)) - [1.0, 2.0, 3.0]
    np.testing.assert_allclose(over, _softmax(gaps).reshape(5, 10, 3).mean(1), rtol=1e-4)


def test_detector_windows(deploy, tmp_path):
    import cv2
    img = np.random.RandomState(1).randint(0, 255, (20, 30, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    det = caffe.Detector(deploy, None, raw_scale=255)
    windows = [np.array([0, 0, 6, 6]), np.array([2, 5, 14, 17])]
    out = det.detect_windows([(str(tmp_path / "a.png"), windows)])
    assert [d["filename"] for d in out] == [str(tmp_path / "a.png")] * 2
    rgb = img[:, :, ::-1] / 255.0
    first = (rgb[0:6, 0:6] * 255).mean((0, 1))
    np.testing.assert_allclose(out[0]["prediction"].reshape(3), _softmax(first[None])[0], rtol=1e-4)
    padded = caffe.Detector(deploy, None, raw_scale=255, context_pad=1)
    assert padded.crop(rgb.astype(np.float32), windows[1]).shape == (6, 6, 3)



def test_detector_selective_search_uses_the_package_when_installed(deploy, tmp_path,
                                                                   monkeypatch):
    """pycaffe's detect_selective_search hands absolute paths to the (MATLAB-backed)
    selective_search_ijcv_with_python package with cmd='selective_search_rcnn' and runs
    detect_windows on what it returns. The package is written here as a stand-in that
    returns fixed windows; without it, ImportError names it."""
    import cv2
    img = np.random.RandomState(2).randint(0, 255, (20, 30, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "b.png"), img)
    det = caffe.Detector(deploy, None, raw_scale=255)
    with pytest.raises(ImportError, match="selective_search_ijcv_with_python"):
        det.detect_selective_search([str(tmp_path / "b.png")])
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "selective_search_ijcv_with_python.py").write_text(
        "import numpy as np\ncalls = []\n"
        "def get_windows(image_fnames, cmd='selective_search'):\n"
        "    calls.append((list(image_fnames), cmd))\n"
        "    return [np.array([[0, 0, 6, 6], [2, 5, 14, 17]]) for _ in image_fnames]\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.chdir(tmp_path)
    out = det.detect_selective_search(["b.png"])
    import selective_search_ijcv_with_python as ss
    assert ss.calls == [([str(tmp_path / "b.png")], "selective_search_rcnn")]
    windows = [np.array([0, 0, 6, 6]), np.array([2, 5, 14, 17])]
    expected = det.detect_windows([(str(tmp_path / "b.png"), windows)])
    assert [d["filename"] for d in out] == [str(tmp_path / "b.png")] * 2
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(got["window"], want["window"])
        np.testing.assert_array_equal(got["prediction"], want["prediction"])


PYCAFFE_NAMES = (
    "Net Solver SGDSolver NesterovSolver AdaGradSolver RMSPropSolver AdaDeltaSolver AdamSolver "
    "get_solver layers params NetSpec to_proto io proto draw net_spec coord_map classifier "
    "detector Classifier Detector pycaffe Layer TRAIN TEST set_mode_cpu set_mode_gpu set_device "
    "set_random_seed layer_type_list init_log log NCCL Timer has_nccl solver_count "
    "set_solver_count solver_rank set_solver_rank set_multiprocess _caffe").split()


def test_every_pycaffe_name_and_submodule():
    missing = [n for n in PYCAFFE_NAMES if not hasattr(caffe, n)]
    assert missing == []
    import importlib
    import caffe_compat
    from caffe.proto import caffe_pb2
    importlib.import_module("caffe.io")
    assert importlib.import_module("caffe.coord_map") is caffe_compat.coord_map
    assert caffe.io is caffe_compat.io and caffe_pb2 is caffe_compat.proto.caffe_pb2
    assert caffe.coord_map is caffe_compat.coord_map
    assert caffe.__caffe_compat__ is True and caffe.__file__.endswith("__init__.py")
    assert (caffe.TRAIN, caffe.TEST) == (caffe_pb2.TRAIN, caffe_pb2.TEST)


def test_runtime_helpers(capsys):
    timer = caffe.Timer()
    timer.start()
    sum(range(1000))
    timer.stop()
    assert timer.ms >= 0.0
    assert caffe.has_nccl() is True               # over torch.distributed (test_pycaffe_nccl.py)
    uid = caffe.NCCL.new_uid()
    assert isinstance(uid, bytes) and uid != caffe.NCCL.new_uid()
    caffe.NCCL(None, uid).bcast()                  # one solver: no group to join, nothing to do
    assert caffe.solver_count() == 1 and caffe.solver_rank() == 0
    caffe.set_solver_count(2)
    caffe.set_solver_rank(1)
    try:
        assert (caffe.solver_count(), caffe.solver_rank()) == (2, 1)
    finally:
        caffe.set_solver_count(1)
        caffe.set_solver_rank(0)
    caffe.init_log(0, True)
    caffe.log("hello from pycaffe")
    assert "_caffe.cpp:68] hello from pycaffe" in capsys.readouterr().err
