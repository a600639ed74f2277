"""Engines as a pass of the inference plan (engine/backends/plan_pass.py) and pycaffe's
semantics around them: one runtime step run by the executor, outputs written into the blobs,
a new choice after a reshape, stale blobs and backward from the inputs of the last forward,
the timing rule on a fake clock."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.backends import engine as engines
from caffe_compat.engine.backends.plan_pass import EngineCall
from caffe_compat.engine.net.plan import execute
from test_backends import ENGINES, _forward, _prototxt, _weights, assert_same_rows

pytestmark = pytest.mark.skipif(not ENGINES, reason="no ONNX runtime installed")


def _pair(tmp_path, family: str, engine: str):
    proto = _prototxt(tmp_path, family)
    weights = _weights(tmp_path, proto)
    return caffe.Net(proto, weights, caffe.TEST), caffe.Net(proto, weights, caffe.TEST,
                                                              engine=engine)


def _close(got, want, tol=1e-4):
    scale = max(1.0, float(np.abs(want).max()))
    assert got.shape == want.shape and np.abs(got - want).max() / scale <= tol


class _Seen:
    """Executor hooks that note each step's name."""

    def __init__(self):
        self.names = []

    def before(self, step, args):
        return args

    def after(self, step, args, outs):
        self.names.append(step.name)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_exported_prefix_is_one_step_and_the_rest_stays_torch(tmp_path, engine):
    ref, net = _pair(tmp_path, "ssd_face", engine)
    plan = net._fast.choice.forward
    assert isinstance(plan.plan[0].fn, EngineCall) and plan.plan[0].name.startswith(engine)
    suffix = [net.module.layers[s.index].type for s in plan.plan[1:]]
    assert suffix == ["DetectionOutput"]
    x = np.random.default_rng(0).random(ref.blobs["data"].shape, dtype=np.float32)
    seen = _Seen()
    blobs = execute(plan.plan, {"data": torch.from_numpy(x)}, hooks=seen)
    assert seen.names == [s.name for s in plan.plan]               # the executor ran it
    want = ref.forward(data=x)["detection_out"]
    assert_same_rows(blobs["detection_out"].numpy(), want, 2e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_outputs_land_in_the_blobs_and_old_arrays_are_left_alone(tmp_path, engine):
    ref, net = _pair(tmp_path, "mtcnn_rnet", engine)
    rng = np.random.default_rng(1)
    x = rng.random(ref.blobs["data"].shape, dtype=np.float32)
    out = net.forward(data=x)
    assert all(out[n] is net.blobs[n].data for n in net.outputs)     # pycaffe's arrays
    want = _forward(ref, x)
    for name in want:
        _close(out[name], want[name])
    held = {n: net.blobs[n].data for n in net.outputs}
    before = {n: a.copy() for n, a in held.items()}
    for name, array in held.items():             # new arrays of the same shape
        net.blobs[name].reshape(array.size + 1)
        net.blobs[name].reshape(*array.shape)
    x2 = rng.random(x.shape, dtype=np.float32)
    got, want = _forward(net, x2), _forward(ref, x2)
    assert net.engine == engine
    for name in want:
        _close(got[name], want[name])
        assert net.blobs[name].data is not held[name]
        np.testing.assert_array_equal(held[name], before[name])   # not written any more


def _reshaped_forward_equal(ref, net, batch: int, rng) -> None:
    """Both nets reshaped to ``batch``; their outputs on one random input equal."""
    shape = net.blobs["data"].shape
    for target in (net, ref):
        target.blobs["data"].reshape(batch, *shape[1:])
        target.reshape()
    x = rng.random((batch, *shape[1:]), dtype=np.float32)
    _close(_forward(net, x)["prob"], _forward(ref, x)["prob"])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_reshape_decides_again_and_a_known_shape_reuses_its_choice(tmp_path, engine):
    ref, net = _pair(tmp_path, "lenet", engine)
    first = net._fast.choice
    shape = net.blobs["data"].shape
    rng = np.random.default_rng(2)
    for batch in (3, shape[0]):
        _reshaped_forward_equal(ref, net, batch, rng)
        assert net.engine == engine
        assert net._fast.choice.forward.inputs["data"].shape[0] == batch
    # batch 3 (new, once) ran the shape-generic export; the load's shape kept its own
    assert net._fast.choice is first and len(net._fast._by_shape) == 1
    assert net._fast._any is not None


def test_a_shape_where_torch_was_chosen_does_not_stick(tmp_path, monkeypatch):
    """Torch chosen at one batch (here: made to), the engine at the other: going back to
    the first batch takes the engine again."""
    from caffe_compat._pycaffe import fast
    real = fast.choose_engine

    def torch_at_batch_3(module, request, torch_forward, **kwargs):
        if kwargs["shapes"]["data"][0] == 3:
            return engines.EngineChoice("torch", None, "made to", verified=True)
        return real(module, request, torch_forward, **kwargs)
    monkeypatch.setattr(fast, "choose_engine", torch_at_batch_3)
    ref, net = _pair(tmp_path, "lenet", ENGINES[0])
    rng = np.random.default_rng(7)
    for batch, engine in ((3, "torch"), (net.blobs["data"].shape[0], ENGINES[0]),
                          (3, "torch")):
        _reshaped_forward_equal(ref, net, batch, rng)
        assert net.engine == engine


@pytest.mark.parametrize("engine", ENGINES)
def test_cycling_through_many_shapes_decides_each_shape_once(tmp_path, monkeypatch, engine):
    """An image pyramid (MTCNN's P-Net at 6 scales, per image) cycles through many input
    shapes. Past the load's shape one decision, a shape-generic export (or torch, for an
    engine of fixed shapes only), serves them; the shapes the cycle keeps coming back to get
    exports of their own, up to SHAPES_KEPT. Forgetting every choice when the store was full
    once exported and measured again on every call (a 6-scale cycle: ~0.5 s against 8 ms)."""
    from caffe_compat._pycaffe import fast
    from caffe_compat.engine.backends.runners import RUNNERS
    real, decided = fast.choose_engine, []

    def counted(module, request, torch_forward, **kwargs):
        decided.append((kwargs["shapes"]["data"][0], kwargs.get("any_shape", False)))
        return real(module, request, torch_forward, **kwargs)
    monkeypatch.setattr(fast, "choose_engine", counted)
    ref, net = _pair(tmp_path, "lenet", engine)
    rng = np.random.default_rng(8)
    batches = range(2, fast.SHAPES_KEPT + 4)
    past = engine if RUNNERS[engine].shape_generic else "torch"
    promoted = list(batches)[:fast.SHAPES_KEPT - 1]           # the load's shape is kept too
    for cycle in range(1, fast.PROMOTE_AFTER + 2):
        for batch in batches:
            _reshaped_forward_equal(ref, net, batch, rng)
            own = cycle >= fast.PROMOTE_AFTER and batch in promoted
            assert net.engine == (engine if own else past), (cycle, batch)
    assert decided == [(1, False), (2, True)] + [(b, False) for b in promoted], decided


@pytest.mark.parametrize("engine", ENGINES)
def test_blobs_read_after_the_input_changed_are_those_of_the_last_forward(tmp_path, engine):
    ref, net = _pair(tmp_path, "mtcnn_onet", engine)
    rng = np.random.default_rng(3)
    x, later = (rng.random(ref.blobs["data"].shape, dtype=np.float32) for _ in range(2))
    _forward(ref, x), _forward(net, x)
    net.blobs["data"].data[...] = later           # written, not forwarded (Caffe keeps
    np.testing.assert_allclose(net.blobs["conv2"].data, ref.blobs["conv2"].data,  # x's)
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(net.blobs["data"].data, later)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stale_read_leaves_the_outputs_as_the_forward_returned_them(tmp_path, engine):
    """Reading an inner blob recomputes the stale blobs in torch; the outputs keep the
    engine's values the forward returned (Caffe runs nothing on a read), in the same arrays,
    which the next forward writes again."""
    ref, net = _pair(tmp_path, "ssd_face", engine)
    rng = np.random.default_rng(5)
    x, later = (rng.random(ref.blobs["data"].shape, dtype=np.float32) for _ in range(2))
    out = net.forward(data=x)
    returned = {n: a.copy() for n, a in out.items()}
    inner = [n for n in net.blobs if n not in out and n not in net.inputs]
    net.blobs[inner[len(inner) // 2]].data
    for name, array in out.items():
        assert net.blobs[name].data is array
        np.testing.assert_array_equal(array, returned[name])
    got, want = _forward(net, later), _forward(ref, later)
    assert net.engine == engine
    assert_same_rows(got["detection_out"], want["detection_out"], 2e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_held_weight_view_keeps_the_engine_until_it_is_written(tmp_path, engine):
    """A numpy view of a weight kept by the caller sent every forward to torch; now the
    engine runs while the view's values are unchanged, and a write through it is seen."""
    ref, net = _pair(tmp_path, "lenet", engine)
    x = np.random.default_rng(6).random(ref.blobs["data"].shape, dtype=np.float32)
    filters = net.params["conv1"][0].data
    _forward(net, x)                                 # exported again for the hand-out
    call, runs = net._fast.choice.forward.call, []
    honest = call._run
    call._run = lambda: (runs.append(1), honest())
    for _ in range(2):
        _close(_forward(net, x)["prob"], _forward(ref, x)["prob"])
    assert len(runs) == 2 and net.engine == engine
    filters *= 0.5
    ref.params["conv1"][0].data[...] *= 0.5
    _close(_forward(net, x)["prob"], _forward(ref, x)["prob"])


LOSS = """
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_backward_after_an_engine_forward_equals_torch(tmp_path, engine):
    """A TEST net with a loss, fed by Input layers: the forward's loss from the engine,
    the backward's gradients from torch on the same inputs."""
    proto = tmp_path / "lenet_loss.prototxt"
    proto.write_text(open(_prototxt(tmp_path, "lenet")).read() + LOSS)
    ref, net = caffe.Net(str(proto), caffe.TEST), caffe.Net(str(proto), caffe.TEST,
                                                            engine=engine)
    ref.share_with(net)
    assert net.engine == engine
    x = np.random.default_rng(4).random(ref.blobs["data"].shape, dtype=np.float32)
    grads, losses = [], []
    for target in (ref, net):
        losses.append(float(target.forward(data=x, label=np.array([3.0]))["loss"]))
        target.clear_param_diffs()
        target.backward()
        grads.append(target.params["conv1"][0].diff.copy())
    assert np.abs(grads[0]).max() > 0
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.skipif("openvino" not in ENGINES, reason="openvino is not installed")
def test_openvino_compiles_in_float32_on_the_requested_threads(tmp_path):
    net = caffe.Net(_prototxt(tmp_path, "lenet"), caffe.TEST, engine="openvino")
    settings = net._fast.choice.forward.settings
    assert "INFERENCE_PRECISION_HINT f32" in settings and "NUM_STREAMS 1" in settings
    assert f"INFERENCE_NUM_THREADS {torch.get_num_threads()}" in settings


def test_the_timing_rule_is_the_median_of_rotated_alternating_rounds(monkeypatch):
    """On a fake clock: 'a' takes 1 unit but 100 on a third of its calls (a neighbour's
    burst), 'b' always 2; the best-of rule and the mean would both mislead one way or the
    other, the median says a. The order rotates, so no candidate always runs first."""
    clock = itertools.count()
    now = [0.0]
    order = []
    monkeypatch.setattr(engines.time, "perf_counter", lambda: now[0])

    def step(name, costs):
        costs = itertools.cycle(costs)

        def run():
            next(clock)
            order.append(name)
            now[0] += next(costs)
        return run
    times = engines.median_times({"a": step("a", [1, 1, 100]), "b": step("b", [2])},
                                 budget_s=0, rounds=(9, 9))
    assert times == {"a": 1, "b": 2}
    rounds = [order[i:i + 2] for i in range(2, len(order), 2)]
    assert rounds[0] == ["a", "b"] and rounds[1] == ["b", "a"]


def test_the_timing_ends_early_only_for_a_clear_leader(monkeypatch):
    """On a fake clock: 'a' at 1 and 'b' at 5 every call are told apart after CLEAR_AFTER
    rounds; 'a' at 1 or 3 against 'b' at 2 overlap, and get every round allowed."""
    now = [0.0]
    calls = []
    monkeypatch.setattr(engines.time, "perf_counter", lambda: now[0])

    def step(costs):
        costs = itertools.cycle(costs)

        def run():
            calls.append(1)
            now[0] += next(costs)
        return run
    times = engines.median_times({"a": step([1]), "b": step([5])}, budget_s=0,
                                 rounds=(50, 50))
    assert times == {"a": 1, "b": 5} and len(calls) == 2 + 2 * engines.CLEAR_AFTER
    calls.clear()
    engines.median_times({"a": step([1, 3]), "b": step([2])}, budget_s=0, rounds=(50, 50))
    assert len(calls) == 2 + 2 * 50


def test_caffe_time_through_an_engine_times_its_plan_steps(tmp_path, capsys):
    from caffe_compat.commands import caffe_main
    proto = _prototxt(tmp_path, "ssd_face")
    assert caffe_main.main(["time", "--model", proto, "--phase", "TEST", "--iterations", "2",
                            "--engine", ENGINES[0], "--threads", "1"]) == 0
    err = capsys.readouterr().err
    steps = [l.split("] ", 1)[1] for l in err.splitlines() if "\tforward: " in l]
    assert len(steps) == 2
    assert steps[0].strip().startswith(f"{ENGINES[0]} (") and "(DetectionOutput)" in steps[1]
    assert "Average Forward pass" in err


def test_the_engine_prefix_keeps_the_specialised_forms(tmp_path):
    """The export records the forms the fused plan runs: UltraFace's softmax over its 2-wide
    last axis moved to the front (OpenVINO ran the plain form about 13% slower at batch 16)."""
    from caffe_compat.engine.backends.split import split_steps
    from caffe_compat.engine.net.fuse import fused_for_inference
    net = caffe.Net(_prototxt(tmp_path, "ultraface_slim"), caffe.TEST)
    fused = fused_for_inference(net.module)
    calls = {step.name: step.call for step in fused.plan}
    prefix = split_steps(fused.plan, net.module).prefix.plan
    softmax = [s for s in prefix if s.fn is not None and getattr(s.fn, "type", "") == "Softmax"]
    assert softmax
    for step in softmax:
        assert step.call is calls[step.name] and step.call != step.fn.forward
