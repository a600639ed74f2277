"""Bad solver input fails at once with the file, the setting and the fix named."""
from __future__ import annotations

from pathlib import Path

import pytest

import caffe_compat as caffe
from caffe_compat.formats.blob_io import ProtoTextError
from caffe_compat.engine.solver import SolverParamError, SnapshotError, read_solver_param, solver_types
from caffe_compat.engine.solver.lr_policy import LR_POLICIES

NET = """
name: "tiny"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

BASE = 'net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 2\n'


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOG_minloglevel", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(NET)


def _solver_file(text: str, name: str = "solver.prototxt") -> str:
    Path(name).write_text(text)
    return name


def test_missing_solver_file():
    with pytest.raises(FileNotFoundError, match="nope.prototxt"):
        caffe.get_solver("nope.prototxt")


def test_malformed_solver_file_names_line():
    path = _solver_file(BASE + "momentum 0.9\n")
    with pytest.raises(ProtoTextError) as err:
        caffe.get_solver(path)
    assert err.value.filename == path and err.value.line == 5
    assert str(err.value).startswith("solver.prototxt:5:")


def test_unknown_field_names_line():
    path = _solver_file(BASE + "learning_rate: 0.1\n")
    with pytest.raises(ProtoTextError, match=r"solver.prototxt:5:"):
        caffe.get_solver(path)


def test_net_path_not_found_names_both_places(tmp_path):
    Path("sub").mkdir()
    path = _solver_file(BASE.replace("net.prototxt", "missing.prototxt"), "sub/solver.prototxt")
    with pytest.raises(FileNotFoundError) as err:
        caffe.get_solver(path)
    msg = str(err.value)
    assert "missing.prototxt" in msg
    assert str(tmp_path / "missing.prototxt") in msg
    assert str(tmp_path / "sub" / "missing.prototxt") in msg


def test_net_path_relative_to_solver_folder(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "net_b.prototxt").write_text(NET)
    path = _solver_file(BASE.replace("net.prototxt", "net_b.prototxt"), "sub/solver.prototxt")
    solver = caffe.get_solver(path)
    assert solver.train_module.source == str(sub / "net_b.prototxt")


@pytest.mark.parametrize("interval", [0, -5])
def test_test_interval_must_be_positive_with_test_nets(interval):
    path = _solver_file(BASE + f"test_iter: 2\ntest_interval: {interval}\n")
    with pytest.raises(SolverParamError, match="test_interval must be > 0"):
        caffe.get_solver(path)


def test_test_iter_count_must_match_test_nets():
    path = _solver_file('train_net: "net.prototxt"\ntest_net: "net.prototxt"\n'
                        'test_net: "net.prototxt"\ntest_iter: 1\ntest_interval: 5\n'
                        'base_lr: 0.1\nlr_policy: "fixed"\n')
    with pytest.raises(SolverParamError, match="test_iter must be specified for each test network"):
        caffe.get_solver(path)


def test_test_state_count_must_match():
    path = _solver_file(BASE + "test_iter: 1\ntest_interval: 5\n"
                        "test_state { stage: 'a' }\ntest_state { stage: 'b' }\n")
    with pytest.raises(SolverParamError, match="test_state"):
        caffe.get_solver(path)


def test_two_train_nets_rejected():
    path = _solver_file(BASE + 'train_net: "net.prototxt"\n')
    with pytest.raises(SolverParamError, match="more than one train net"):
        caffe.get_solver(path)


def test_unknown_solver_type_lists_known():
    path = _solver_file(BASE + 'type: "LBFGS"\n')
    with pytest.raises(SolverParamError) as err:
        caffe.get_solver(path)
    assert "Unknown solver type: LBFGS" in str(err.value)
    for name in solver_types():
        assert name in str(err.value)
    assert solver_types() == ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"]


def test_unknown_lr_policy_lists_known():
    path = _solver_file(BASE.replace('"fixed"', '"cosine"'))
    with pytest.raises(SolverParamError) as err:
        caffe.get_solver(path)
    assert "cosine" in str(err.value) and all(p in str(err.value) for p in LR_POLICIES)


@pytest.mark.parametrize("solver_type", ["AdaGrad", "RMSProp"])
def test_momentum_rejected_for_adagrad_rmsprop(solver_type):
    path = _solver_file(BASE + f'type: "{solver_type}"\nmomentum: 0.9\n')
    with pytest.raises(SolverParamError, match=f"Momentum cannot be used with {solver_type}"):
        caffe.get_solver(path)


def test_typed_constructor_checks_momentum_too():
    path = _solver_file(BASE + "momentum: 0.9\n")
    with pytest.raises(SolverParamError, match="Momentum cannot be used with AdaGrad"):
        caffe.AdaGradSolver(path)


def test_rms_decay_range():
    path = _solver_file(BASE + 'type: "RMSProp"\nrms_decay: 1.0\n')
    with pytest.raises(SolverParamError, match="rms_decay"):
        caffe.get_solver(path)


def test_legacy_solver_type_enum():
    param = read_solver_param(_solver_file(BASE + "solver_type: ADAM\n"))
    assert param.type == "Adam" and not param.HasField("solver_type")
    both = _solver_file(BASE + 'solver_type: NESTEROV\ntype: "Nesterov"\n', "both.prototxt")
    with pytest.raises(SolverParamError, match="keep only 'type'"):
        read_solver_param(both)


def test_unknown_regularization_type():
    path = _solver_file(BASE + 'weight_decay: 0.1\nregularization_type: "L3"\n')
    with pytest.raises(SolverParamError, match="regularization type: L3"):
        caffe.get_solver(path)


def test_average_loss_and_iter_size_positive():
    with pytest.raises(SolverParamError, match="average_loss"):
        caffe.get_solver(_solver_file(BASE + "average_loss: 0\n"))
    with pytest.raises(SolverParamError, match="iter_size"):
        caffe.get_solver(_solver_file(BASE + "iter_size: 0\n", "s2.prototxt"))


def test_snapshot_prefix_not_writable():
    path = _solver_file(BASE + 'snapshot: 1\nsnapshot_prefix: "no/such/dir/x"\n')
    with pytest.raises(SolverParamError, match="Cannot write to snapshot prefix 'no/such/dir/x'"):
        caffe.get_solver(path)


def test_restore_history_count_mismatch():
    sgd = caffe.get_solver(_solver_file(BASE + 'momentum: 0.9\nsnapshot_prefix: "a"\n'))
    _, state = sgd.snapshot()
    adam = caffe.get_solver(_solver_file(BASE + 'type: "Adam"\n', "adam.prototxt"))
    with pytest.raises(SnapshotError, match="Incorrect length of history blobs"):
        adam.restore(state)


def test_restore_missing_learned_net():
    sgd = caffe.get_solver(_solver_file(BASE + 'snapshot_prefix: "a"\n'))
    model, state = sgd.snapshot()
    Path(model).unlink()
    with pytest.raises(FileNotFoundError, match="learned_net 'a_iter_0.caffemodel' not found"):
        sgd.restore(state)


def test_restore_missing_state():
    sgd = caffe.get_solver(_solver_file(BASE))
    with pytest.raises(FileNotFoundError, match="x.solverstate"):
        sgd.restore("x.solverstate")
