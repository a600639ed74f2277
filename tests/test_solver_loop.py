"""The solver loop: loss smoothing, test rounds, snapshots, iter_size, non-finite loss, log lines."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import base as layer_base
from caffe_compat.engine.layers.base import Layer
from caffe_compat.proto import caffe_pb2
from caffe_compat.engine.solver import IterationDone, NonFiniteLossError
from caffe_compat.formats import glog
from caffe_compat.engine.solver.params import resolve_snapshot_prefix
from caffe_compat.engine.solver.snapshot import read_state, snapshot_filename, tensor_to_blobproto

GOLDEN_LOG = Path(__file__).parent / "goldens" / "data" / "caffe_train.log"

# ---------------------------------------------------------------- test-only source layers
_RNG = np.random.default_rng(0)
SEQ_X = _RNG.normal(size=(64, 3)).astype(np.float32)
SEQ_Y = _RNG.integers(0, 3, size=64).astype(np.float32)


class _Sequence(Layer):
    """Serves SEQ_X/SEQ_Y in order, ``input_param.shape[0].dim[0]`` rows per forward."""
    type = "TestSolverSequence"
    num_bottoms = (0, 0)
    num_tops = (2, 2)

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.batch = int(param.input_param.shape[0].dim[0])
        self.cursor = 0

    def top_shapes(self, bottom_shapes):
        return [(self.batch, 3), (self.batch,)]

    def forward(self):
        idx = (self.cursor + np.arange(self.batch)) % len(SEQ_X)
        self.cursor += self.batch
        return torch.from_numpy(SEQ_X[idx]), torch.from_numpy(SEQ_Y[idx])


class _Counter(Layer):
    """The k-th forward outputs [k, 10k]: averages over test_iter are easy to predict."""
    type = "TestSolverCounter"
    num_bottoms = (0, 0)
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.k = 0

    def top_shapes(self, bottom_shapes):
        return [(2,)]

    def forward(self):
        k, self.k = self.k, self.k + 1
        return torch.tensor([k, 10.0 * k])



@pytest.fixture(autouse=True)
def _test_layers(monkeypatch):
    """Register the test-only layers for this module's tests only (registry-wide tests of
    other modules must not see them)."""
    for cls in (_Sequence, _Counter):
        monkeypatch.setitem(layer_base._REGISTRY, cls.type, cls)

# ---------------------------------------------------------------- nets and helpers
INPUT_NET = """
name: "tiny"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "log1" type: "Log" bottom: "data" top: "logd" }
layer { name: "ip" type: "InnerProduct" bottom: "logd" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def seq_net(batch: int) -> str:
    return f"""
name: "seq"
layer {{ name: "data" type: "TestSolverSequence" top: "data" top: "label"
  input_param {{ shape {{ dim: {batch} }} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 0.5 }}
    bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""


COUNTER_NET = """
name: "counter"
layer { name: "count" type: "TestSolverCounter" top: "count" }
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOG_minloglevel", "1")
    monkeypatch.chdir(tmp_path)
    Path("input.prototxt").write_text(INPUT_NET)


def _solver(text: str, name: str = "solver.prototxt", cls=caffe.get_solver):
    Path(name).write_text(text)
    return cls(name)


def _feed(solver, rng, data=None) -> None:
    solver.net.blobs["data"].data[...] = rng.uniform(0.5, 2.0, (4, 3)) if data is None else data
    solver.net.blobs["label"].data[...] = rng.integers(0, 3, 4)


BASE = 'net: "input.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 100\nmomentum: 0.9\n'


# ---------------------------------------------------------------- average_loss
def test_average_loss_ring_buffer():
    solver = _solver(BASE + "average_loss: 3\n")
    rng = np.random.default_rng(1)
    losses = []
    solver.subscribe(lambda event: losses.append(event.loss), IterationDone)
    inputs = [(rng.uniform(0.5, 2, (4, 3)), rng.integers(0, 3, 4)) for _ in range(7)]
    seen = []

    def feed_next():
        d, l = inputs[len(seen)]
        solver.net.blobs["data"].data[...] = d
        solver.net.blobs["label"].data[...] = l
        seen.append(1)

    solver.add_callback(on_start=feed_next)
    solver.step(2)       # buffer not full: running mean
    assert solver.smoothed_loss == pytest.approx(np.mean(losses[:2]), rel=1e-6)
    solver.step(5)       # a new Step clears the buffer; 5 losses through a ring of 3
    assert solver.smoothed_loss == pytest.approx(np.mean(losses[-3:]), rel=1e-5)


# ---------------------------------------------------------------- testing
def test_test_phase_averages_over_test_iter():
    Path("counter.prototxt").write_text(COUNTER_NET)
    solver = _solver(BASE + 'test_net: "counter.prototxt"\ntest_iter: 4\ntest_interval: 3\n'
                     .replace('net: "input', 'train_net: "input'))
    assert solver.test(0) == [1.5, 15.0]          # forwards 0..3
    assert solver.test(0) == [5.5, 55.0]          # the source keeps its cursor (4..7)
    assert solver.test_nets[0].blobs["count"].data.tolist() == [7.0, 70.0]
    rng = np.random.default_rng(0)
    solver.add_callback(on_start=lambda: _feed(solver, rng))
    solver.step(4)                                  # tests at iter 0 and 3
    assert solver.mean_scores[0] == [13.5, 135.0]   # forwards 12..15


def test_test_initialization_false_and_generic_test_nets():
    solver = _solver(BASE + "test_iter: 2\ntest_iter: 1\ntest_interval: 2\n"
                     "test_initialization: false\ntest_compute_loss: true\n")
    assert len(solver.test_nets) == 2 and solver.test_modules[0].phase == caffe.TEST
    calls = []
    solver.test = lambda i=0: calls.append((solver.iter, i))
    rng = np.random.default_rng(0)
    solver.add_callback(on_start=lambda: _feed(solver, rng))
    solver.step(5)
    assert calls == [(2, 0), (2, 1), (4, 0), (4, 1)]


def test_test_nets_share_trained_weights():
    solver = _solver(BASE + "test_iter: 1\ntest_interval: 1\n")
    rng = np.random.default_rng(0)
    _feed(solver, rng)
    solver.test_nets[0].blobs["data"].data[...] = solver.net.blobs["data"].data
    solver.test_nets[0].blobs["label"].data[...] = solver.net.blobs["label"].data
    solver.step(2)
    w = solver.net.params["ip"][0].data
    np.testing.assert_array_equal(solver.test_nets[0].params["ip"][0].data, w)


# ---------------------------------------------------------------- snapshots
def test_snapshot_prefix_rules(tmp_path):
    p = caffe_pb2.SolverParameter()
    resolve_snapshot_prefix(p, "models/x/solver.prototxt")
    assert p.snapshot_prefix == "models/x/solver"
    Path("snaps").mkdir()
    p = caffe_pb2.SolverParameter(snapshot_prefix="snaps")
    resolve_snapshot_prefix(p, "models/x/my_solver.prototxt")
    assert p.snapshot_prefix == str(Path("snaps") / "my_solver")
    p = caffe_pb2.SolverParameter(snapshot_prefix="snaps/lenet")
    resolve_snapshot_prefix(p, "solver.prototxt")
    assert p.snapshot_prefix == "snaps/lenet"
    assert snapshot_filename("snaps/lenet", 1000, ".caffemodel") == "snaps/lenet_iter_1000.caffemodel"


@pytest.mark.parametrize("after_train", [True, False])
def test_snapshot_schedule_and_names(after_train):
    Path("out").mkdir()
    text = BASE.replace("max_iter: 100", "max_iter: 5") + \
        f'snapshot: 2\nsnapshot_prefix: "out/run"\nsnapshot_after_train: {str(after_train).lower()}\n'
    solver = _solver(text)
    rng = np.random.default_rng(0)
    solver.add_callback(on_start=lambda: _feed(solver, rng))
    solver.solve()
    names = sorted(p.name for p in Path("out").iterdir())
    expected = ["run_iter_2.caffemodel", "run_iter_2.solverstate",
                "run_iter_4.caffemodel", "run_iter_4.solverstate"]
    if after_train:
        expected += ["run_iter_5.caffemodel", "run_iter_5.solverstate"]
    assert names == expected
    state = read_state("out/run_iter_4.solverstate")
    assert state.iter == 4 and state.learned_net == "out/run_iter_4.caffemodel"


def test_snapshot_prefix_default_is_solver_path():
    Path("cfg").mkdir()
    Path("cfg/input.prototxt").write_text(INPUT_NET)
    solver = _solver(BASE, "cfg/solver.prototxt")
    model, state = solver.snapshot()
    assert (model, state) == ("cfg/solver_iter_0.caffemodel", "cfg/solver_iter_0.solverstate")


def test_hdf5_snapshot_names():
    solver = _solver(BASE + 'snapshot_format: HDF5\nsnapshot_prefix: "h"\n')
    assert solver.snapshot() == ("h_iter_0.caffemodel.h5", "h_iter_0.solverstate.h5")


def test_solve_resume_equals_uninterrupted():
    text = BASE.replace("max_iter: 100", "max_iter: 6") + 'snapshot: 3\nsnapshot_prefix: "r"\n'
    data = [(np.random.default_rng(i).uniform(0.5, 2, (4, 3)), [0, 1, 2, 1]) for i in range(6)]

    def feeder(s):
        def on_start():
            d, l = data[s.iter]
            s.net.blobs["data"].data[...] = d
            s.net.blobs["label"].data[...] = l
        return on_start

    caffe.set_random_seed(5)
    full = _solver(text)
    full.add_callback(on_start=feeder(full))
    full.solve()
    w_full = full.net.params["ip"][0].data.copy()
    resumed = _solver(text, "solver2.prototxt")
    resumed.param.snapshot_prefix = "r2"
    resumed.add_callback(on_start=feeder(resumed))
    resumed.solve("r_iter_3.solverstate")
    assert resumed.iter == 6
    np.testing.assert_array_equal(resumed.net.params["ip"][0].data, w_full)


def test_action_request_snapshot_and_stop():
    solver = _solver(BASE + 'snapshot_prefix: "act"\n')
    rng = np.random.default_rng(0)
    solver.add_callback(on_start=lambda: _feed(solver, rng))
    actions = iter(["none", "snapshot", "stop"])
    solver.add_action_source(lambda: next(actions, "none"))
    solver.solve()
    assert solver.iter == 3 and solver.requested_early_exit
    assert Path("act_iter_2.caffemodel").exists() and Path("act_iter_3.caffemodel").exists()


def test_fast_blobproto_encoding_matches_protobuf():
    t, d = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    for diff in (None, d):
        blob = tensor_to_blobproto(t, diff)
        ref = caffe_pb2.BlobProto()
        ref.shape.dim.extend([3, 4, 5])
        ref.data.extend(t.numpy().ravel().tolist())
        if diff is not None:
            ref.diff.extend(d.numpy().ravel().tolist())
        assert blob.SerializeToString() == ref.SerializeToString()
    assert tensor_to_blobproto(torch.zeros(0, 2)).SerializeToString() == \
        caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[0, 2])).SerializeToString()


# ---------------------------------------------------------------- iter_size
def _seq_solver(batch: int, extra: str, name: str):
    Path(f"{name}.prototxt").write_text(seq_net(batch))
    text = (f'net: "{name}.prototxt"\nbase_lr: 0.2\nlr_policy: "fixed"\nmomentum: 0.9\n'
            f'weight_decay: 0.01\nmax_iter: 10\n{extra}')
    return _solver(text, f"{name}_solver.prototxt")


@pytest.mark.parametrize("clip", [None, 0.3])
def test_iter_size_equals_doubled_batch(clip):
    """iter_size=2 at batch 4 == batch 8; clipping sees the raw sum, so clip c ~ c/2."""
    acc = _seq_solver(4, "iter_size: 2\n" + (f"clip_gradients: {clip}\n" if clip else ""), "acc")
    big = _seq_solver(8, f"clip_gradients: {clip / 2}\n" if clip else "", "big")
    for layer in ("ip1", "ip2"):
        for a, b in zip(acc.net.params[layer], big.net.params[layer]):
            a.data[...] = b.data
    acc.step(4)
    big.step(4)
    for layer in ("ip1", "ip2"):
        for i, (a, b) in enumerate(zip(acc.net.params[layer], big.net.params[layer])):
            np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6, err_msg=f"{layer}[{i}]")
    assert float(acc.net.blobs["loss"].data) > 0


# ---------------------------------------------------------------- non-finite loss
def test_nan_loss_stops_with_layer_and_snapshot():
    solver = _solver(BASE + 'snapshot_prefix: "nan"\n')
    rng = np.random.default_rng(0)
    for _ in range(2):
        _feed(solver, rng)
        solver.step(1)
    w_finite = solver.net.params["ip"][0].data.copy()
    _feed(solver, rng, data=np.zeros((4, 3)))      # log(0) = -inf
    with pytest.raises(NonFiniteLossError) as err:
        solver.step(1)
    msg = str(err.value)
    assert msg.startswith("Iteration 2: the training loss is nan")
    assert "top 'logd' of layer 'log1' (Log)" in msg
    assert "nan_iter_2.caffemodel" in msg
    assert solver.iter == 2
    restored = _solver(BASE, "again.prototxt")
    restored.restore("nan_iter_2.solverstate")
    np.testing.assert_array_equal(restored.net.params["ip"][0].data, w_finite)
    np.testing.assert_array_equal(solver.net.params["ip"][0].data, w_finite)  # no bad update


# ---------------------------------------------------------------- log lines
PREFIX = re.compile(r"^([IWEF])(\d{4}) (\d\d:\d\d:\d\d\.\d{6}) +(\d+) ([\w.]+:\d+)\] (.*)$")


def _shape(message: str) -> str:
    """A message with numbers and names abstracted, for comparing line kinds."""
    s = re.sub(r"\(\d[^)]* iter/s, [^)]*\)", "", message)   # BVLC adds the rate; the fork not
    s = re.sub(r"[-+]?\d[\w.+-]*", "N", s)
    return re.sub(r"file \S+$", "file P", s).replace(" ,", ",")


def test_log_lines_match_caffe_shapes(monkeypatch):
    lines: list[str] = []
    monkeypatch.setenv("GLOG_minloglevel", "0")
    glog.set_echo(lines.append)
    try:
        Path("snap").mkdir()
        solver = _solver(BASE.replace("max_iter: 100", "max_iter: 4") +
                         'test_iter: 2\ntest_interval: 2\ndisplay: 2\nsnapshot: 3\n'
                         'snapshot_prefix: "snap/tiny"\n'
                         "test_compute_loss: false\n")
        rng = np.random.default_rng(0)
        for net in [solver.net, *solver.test_nets]:
            net.blobs["data"].data[...] = rng.uniform(0.5, 2, (4, 3))
            net.blobs["label"].data[...] = [0, 1, 2, 0]
        solver.solve()
    finally:
        glog.set_echo(None)
    parsed = [PREFIX.match(l) for l in lines if not l.startswith(" ") and "\n" not in l]
    assert all(parsed), [l for l, m in zip(lines, parsed) if not m]
    ours = {_shape(m.group(6)) for m in parsed}
    golden_shapes = {_shape(l.split("] ", 1)[1]) for l in GOLDEN_LOG.read_text().splitlines()
                     if "solver.cpp" in l and "] " in l}
    for kind in ("Iteration N, Testing net (#N)",
                 "    Train net output #N: loss = N (* N = N loss)",
                 "Iteration N, lr = N", "Iteration N, loss = N", "Solving tiny",
                 "Learning Rate Policy: fixed", "Optimization Done.",
                 "    Test net output #N: loss = N (* N = N loss)",
                 "Snapshotting to binary proto file P",
                 "Snapshotting solver state to binary proto file P"):
        assert kind in ours, kind
        if kind not in ("Learning Rate Policy: fixed",):
            assert kind in golden_shapes or kind.replace("fixed", "step") in golden_shapes, kind
    # the awk fields Caffe's parse_log.sh reads: $9 of "lr" lines, $11 of test output lines
    lr_line = next(l for l in lines if ", lr = " in l)
    assert lr_line.split()[8] == "0.1"
    test_line = next(l for l in lines if "Test net output #0" in l)
    float(test_line.split()[10])
    assert lines.index(next(l for l in lines if "Solving" in l)) < \
        lines.index(next(l for l in lines if "Iteration 0, Testing" in l))


def test_glog_prefix_format():
    import datetime
    now = datetime.datetime(2024, 2, 10, 13, 39, 22, 381027)
    line = glog.format_line("Iteration 100, lr = 0.00992565", "solver.cpp:204", now=now, tid=25210)
    assert line == "I0210 13:39:22.381027 25210 solver.cpp:204] Iteration 100, lr = 0.00992565\n"
    assert glog.format_line("x", "a.cpp:1", now=now, tid=7).startswith("I0210 13:39:22.381027     7 ")
    assert glog.format_line("a\nb\n", "x.cpp:2", now=now, tid=1).endswith("] a\nb\n")
    assert [glog.num(v) for v in (0.01, 1e-05, 2.302585, 3, 1234567.0)] == \
        ["0.01", "1e-05", "2.30259", "3", "1.23457e+06"]


def test_log_file_written(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOG_minloglevel", "0")
    f = glog.add_log_file(str(tmp_path / "logs" / "train.log"))
    try:
        glog.info("hello", "solver.cpp:1")
    finally:
        glog.remove_log_file(f)
    text = (tmp_path / "logs" / "train.log").read_text()
    assert PREFIX.match(text.splitlines()[0]).group(6) == "hello"


# ---------------------------------------------------------------- nets the solver builds
STAGED_NET = INPUT_NET + """
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include { phase: TEST stage: "val" } }
"""


def test_test_state_and_train_state_merge():
    Path("staged.prototxt").write_text(STAGED_NET)
    solver = _solver('net: "staged.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
                     "test_iter: 1\ntest_iter: 1\ntest_interval: 10\n"
                     'test_state { stage: "val" }\ntest_state { }\n'
                     'train_state { level: 2 }\n')
    assert "acc" in solver.test_modules[0].layer_names
    assert "acc" not in solver.test_modules[1].layer_names
    assert solver.train_module.phase == caffe.TRAIN and solver.test_modules[1].phase == caffe.TEST
    assert solver.test_nets[0].outputs == ["acc", "loss"]


def test_weights_field_loads_every_net():
    first = _solver(BASE + 'snapshot_prefix: "w"\n')
    model, _ = first.snapshot()
    second = _solver(BASE + f'test_iter: 1\ntest_interval: 5\nweights: "{model}"\n', "s2.prototxt")
    for net in (second.net, second.test_nets[0]):
        np.testing.assert_array_equal(net.params["ip"][0].data, first.net.params["ip"][0].data)


def test_pycaffe_solver_allocates_no_engine_input_tensors(tmp_path):
    """pycaffe feeds Input blobs from its own arrays; the engine's zero tensors for them
    (a 154 MB data blob at 256x3x224x224) are made only when the engine feeds the net."""
    text = ('layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 64 dim: 3 dim: 32 dim: 32 } } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            'inner_product_param { num_output: 2 } }\n'
            'layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "ip" top: "l" }\n')
    from test_cli_train import write_solver
    path = write_solver(tmp_path, text, net=f'"{tmp_path / "net.prototxt"}"', test_iter=None,
                        test_interval=None, display=0, snapshot=0)
    solver = caffe.get_solver(str(path))
    solver.step(1)
    assert solver.input_tensors == [None]
    from caffe_compat.engine.solver.base import Solver as EngineSolver
    engine = EngineSolver(str(path))
    engine.step(1)
    assert engine.input_tensors[0]["data"].shape == (64, 3, 32, 32)


def test_pycaffe_solver_lr_is_the_rate_for_the_current_iteration():
    """pycaffe's SGDSolver.lr (GetLearningRate): the policy's rate at solver.iter, before
    that iteration's update; every pycaffe solver type and get_solver's result have it."""
    text = BASE.replace('lr_policy: "fixed"', 'lr_policy: "step"\ngamma: 0.5\nstepsize: 2')
    for cls in (caffe.get_solver, caffe.SGDSolver, caffe.AdamSolver):
        solver = _solver(text, cls=cls)
        rng = np.random.default_rng(0)
        rates = []
        for _ in range(5):
            rates.append(solver.lr)
            _feed(solver, rng)
            solver.step(1)
        assert rates == [float(np.float32(0.1 * 0.5 ** (i // 2))) for i in range(5)]
        assert solver.iter == 5
