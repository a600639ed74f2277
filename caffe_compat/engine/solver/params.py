"""Reading and checking a SolverParameter, and resolving the nets it names (solver.cpp Init).

``read_solver_param`` parses the solver prototxt (errors name file:line:col), upgrades the
legacy ``solver_type`` enum to ``type``, applies Caffe's ``snapshot_prefix`` rules and
validates the settings Caffe CHECKs, so a bad file fails before any net is built.
``train_net_spec`` / ``test_net_specs`` return each net's NetParameter and NetState exactly as
Solver::InitTrainNet / InitTestNets choose them.
"""
from __future__ import annotations

from caffe_compat.formats.errors import CaffeCompatError

import os
from dataclasses import dataclass

from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2
from caffe_compat.engine.solver.detection_eval import AP_VERSIONS
from caffe_compat.engine.solver.lr_policy import LRPolicyError, LR_POLICIES, unknown_policy_message
from caffe_compat.engine.solver.updates import SolverTypeError, rule_class

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST

_LEGACY_TYPES = {caffe_pb2.SolverParameter.SGD: "SGD",
                 caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
                 caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
                 caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
                 caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
                 caffe_pb2.SolverParameter.ADAM: "Adam"}


class SolverParamError(CaffeCompatError):
    """A solver file whose settings Caffe would reject; the message names the file."""


@dataclass
class NetSpec:
    """One net the solver builds: its definition, NetState and where it came from."""
    param: caffe_pb2.NetParameter
    state: caffe_pb2.NetState
    source: str          # file path, or "train_net_param" / "net_param" / "test_net_param"
    description: str     # Caffe's log wording: "net file: x.prototxt", "test_net_param", ...


def read_solver_param(path: str, solver_type: str | None = None) -> caffe_pb2.SolverParameter:
    """Parse, upgrade and validate a solver prototxt.

    ``solver_type`` overrides the file's ``type`` (pycaffe's ``caffe.AdamSolver(path)``).
    """
    path = os.fspath(path)
    param = read_text_proto(path, caffe_pb2.SolverParameter)
    upgrade_solver_param(param, path)
    if solver_type is not None:
        param.type = solver_type
    resolve_snapshot_prefix(param, path)
    validate(param, path)
    return param


def upgrade_solver_param(param: caffe_pb2.SolverParameter, source: str = "<solver>") -> None:
    """Move the deprecated ``solver_type`` enum into ``type`` (upgrade_proto.cpp)."""
    if not param.HasField("solver_type"):
        return
    if param.HasField("type"):
        raise SolverParamError(f"{source}: both the old solver_type field (enum) and the new "
                               "type field (string) are set; keep only 'type'")
    param.type = _LEGACY_TYPES[param.solver_type]
    param.ClearField("solver_type")


def resolve_snapshot_prefix(param: caffe_pb2.SolverParameter, solver_path: str) -> None:
    """Caffe's snapshot_prefix rules (UpgradeSnapshotPrefixProperty).

    Unset: the solver file's path without its extension. A directory: ``dir/<solver stem>``.
    """
    stem = os.path.splitext(os.path.basename(solver_path))[0]
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = os.path.splitext(solver_path)[0]
    elif param.snapshot_prefix and os.path.isdir(param.snapshot_prefix):
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)


def validate(param: caffe_pb2.SolverParameter, source: str = "<solver>") -> None:
    """Caffe's CHECKs on a SolverParameter, raised early with the file named."""
    try:
        rule_class(param.type).check(param)   # unknown type / momentum rules
    except SolverTypeError as exc:
        raise SolverParamError(f"{source}: {exc}") from None
    if param.lr_policy not in LR_POLICIES:
        raise SolverParamError(f"{source}: {unknown_policy_message(param.lr_policy)}")
    if param.lr_policy == "step" and param.stepsize <= 0:
        raise SolverParamError(f"{source}: lr_policy \"step\" needs stepsize > 0 "
                               f"(got {param.stepsize})")
    if param.lr_policy == "poly" and param.max_iter <= 0:
        raise SolverParamError(f"{source}: lr_policy \"poly\" needs max_iter > 0")
    if param.average_loss < 1:
        raise SolverParamError(f"{source}: average_loss should be >= 1 (got {param.average_loss})")
    if param.iter_size < 1:
        raise SolverParamError(f"{source}: iter_size should be >= 1 (got {param.iter_size})")
    if param.regularization_type not in ("L1", "L2"):
        raise SolverParamError(f"{source}: Unknown regularization type: "
                               f"{param.regularization_type} (known: L1, L2)")
    _check_evaluation(param, source)
    _count_train_nets(param, source)
    _count_test_nets(param, source)
    _check_numbers(param, source)


def _check_evaluation(param: caffe_pb2.SolverParameter, source: str) -> None:
    """The SSD fork's eval_type and, for detection, ap_version (the fork aborts on an unknown
    one at the first test; here the solver file is refused before training)."""
    if param.eval_type not in ("classification", "detection"):
        raise SolverParamError(f"{source}: Unknown evaluation type: {param.eval_type} "
                               "(known: classification, detection)")
    if param.eval_type == "detection" and param.ap_version not in AP_VERSIONS:
        raise SolverParamError(f"{source}: Unknown ap_version: {param.ap_version} "
                               f"(known: {', '.join(AP_VERSIONS)})")


_FINITE_FIELDS = ("base_lr", "momentum", "momentum2", "weight_decay", "gamma", "power", "delta",
                  "rms_decay", "clip_gradients")
_COUNT_FIELDS = ("max_iter", "display", "snapshot", "test_interval", "stepsize")


def _check_numbers(param: caffe_pb2.SolverParameter, source: str) -> None:
    """Values that would fail later, mid-run, as ZeroDivisionError/OverflowError/TypeError."""
    for name in _FINITE_FIELDS:
        value = getattr(param, name)
        if value != value or value in (float("inf"), float("-inf")):
            raise SolverParamError(f"{source}: {name} must be a finite number (got {value})")
    for name in _COUNT_FIELDS:
        if getattr(param, name) < 0:
            raise SolverParamError(f"{source}: {name} must be >= 0 (got {getattr(param, name)})")
    if param.type == "Adam":
        for name in ("momentum", "momentum2"):
            if not 0 <= getattr(param, name) < 1:
                raise SolverParamError(f"{source}: Adam needs 0 <= {name} < 1 (got "
                                       f"{getattr(param, name)}); its bias correction divides "
                                       f"by 1 - {name}^t")
    if "\0" in param.snapshot_prefix:
        raise SolverParamError(f"{source}: snapshot_prefix contains a NUL byte")


def _count_train_nets(param, source) -> None:
    fields = ("net", "net_param", "train_net", "train_net_param")
    n = sum(param.HasField(f) for f in fields)
    if n == 0:
        raise SolverParamError(f"{source}: the solver must name a train net with one of: "
                               f"{', '.join(fields)}")
    if n > 1:
        raise SolverParamError(f"{source}: more than one train net given ("
                               f"{', '.join(f for f in fields if param.HasField(f))}); "
                               "use exactly one of: " + ", ".join(fields))


def _count_test_nets(param, source) -> int:
    generic = param.HasField("net") + param.HasField("net_param")
    explicit = len(param.test_net) + len(param.test_net_param)
    n_iter = len(param.test_iter)
    if generic and n_iter < explicit or not generic and n_iter != explicit:
        raise SolverParamError(f"{source}: test_iter must be specified for each test network "
                               f"({explicit} test_net/test_net_param given, {n_iter} test_iter)")
    instances = explicit + (n_iter - explicit if generic else 0)
    if len(param.test_state) and len(param.test_state) != instances:
        raise SolverParamError(f"{source}: test_state must be unset or given once per test net "
                               f"({instances} test nets, {len(param.test_state)} test_state)")
    if instances and param.test_interval <= 0:
        raise SolverParamError(f"{source}: test_interval must be > 0 when there are test nets "
                               f"(got {param.test_interval}; {instances} test net(s) from "
                               "test_iter); set test_interval, or remove test_iter to train "
                               "without testing")
    for i, k in enumerate(param.test_iter):
        if k < 0:
            raise SolverParamError(f"{source}: test_iter #{i} is negative ({k})")
    return instances


def resolve_net_path(path: str, solver_path: str | None) -> str:
    """A net path as Caffe reads it (relative to the working directory), falling back to the
    solver file's folder; an error names both places when neither has it."""
    if os.path.isabs(path):
        if os.path.isfile(path):
            return path
        raise FileNotFoundError(f"{solver_path or '<solver>'}: net file '{path}' not found")
    if os.path.isfile(path):
        return path
    tried = [os.path.abspath(path)]
    if solver_path:
        beside = os.path.join(os.path.dirname(os.path.abspath(solver_path)), path)
        if os.path.isfile(beside):
            return beside
        tried.append(beside)
    raise FileNotFoundError(f"{solver_path or '<solver>'}: net file '{path}' not found (tried "
                            f"{' and '.join(dict.fromkeys(tried))})")


def _read_net(path: str, solver_path: str | None) -> tuple[caffe_pb2.NetParameter, str]:
    resolved = resolve_net_path(path, solver_path)
    return read_text_proto(resolved, caffe_pb2.NetParameter), resolved


def _state(phase: int, net: caffe_pb2.NetParameter,
           extra: caffe_pb2.NetState | None) -> caffe_pb2.NetState:
    """Solver default, then the net's own ``state``, then train_state/test_state (MergeFrom)."""
    state = caffe_pb2.NetState(phase=phase)
    state.MergeFrom(net.state)
    if extra is not None:
        state.MergeFrom(extra)
    return state


def train_net_spec(param: caffe_pb2.SolverParameter, solver_path: str | None = None) -> NetSpec:
    """The train net: train_net_param, train_net, net_param or net (exactly one is set)."""
    if param.HasField("train_net_param"):
        net, source, desc = param.train_net_param, "train_net_param", "train_net_param"
    elif param.HasField("train_net"):
        net, source = _read_net(param.train_net, solver_path)
        desc = f"train_net file: {param.train_net}"
    elif param.HasField("net_param"):
        net, source, desc = param.net_param, "net_param", "net_param"
    elif param.HasField("net"):
        net, source = _read_net(param.net, solver_path)
        desc = f"net file: {param.net}"
    else:
        raise SolverParamError(f"{solver_path or '<solver>'}: no train net "
                               "(net, net_param, train_net or train_net_param)")
    state = _state(TRAIN, net, param.train_state if param.HasField("train_state") else None)
    return NetSpec(net, state, source, desc)


def test_net_specs(param: caffe_pb2.SolverParameter,
                   solver_path: str | None = None) -> list[NetSpec]:
    """Test nets: test_net_param, then test_net, then copies of net_param/net for the
    remaining test_iter entries; each gets NetState TEST + its own state + test_state[i]."""
    specs: list[tuple[caffe_pb2.NetParameter, str, str]] = []
    for net in param.test_net_param:
        specs.append((net, "test_net_param", "test_net_param"))
    for path in param.test_net:
        net, source = _read_net(path, solver_path)
        specs.append((net, source, f"test_net file: {path}"))
    remaining = len(param.test_iter) - len(specs)
    if remaining > 0 and param.HasField("net_param"):
        specs += [(param.net_param, "net_param", "net_param")] * remaining
    elif remaining > 0 and param.HasField("net"):
        net, source = _read_net(param.net, solver_path)
        specs += [(net, source, f"net file: {param.net}")] * remaining
    out = []
    for i, (net, source, desc) in enumerate(specs):
        extra = param.test_state[i] if len(param.test_state) else None
        out.append(NetSpec(net, _state(TEST, net, extra), source, desc))
    return out


__all__ = ["SolverParamError", "NetSpec", "read_solver_param", "upgrade_solver_param",
           "resolve_snapshot_prefix", "validate", "resolve_net_path", "train_net_spec",
           "test_net_specs", "LRPolicyError"]
