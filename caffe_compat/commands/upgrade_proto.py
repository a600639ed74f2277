"""The shared logic of Caffe's upgrade tools (tools/upgrade_*_proto_*.cpp): read a net or
solver definition, bring it to the current format, write it out.

As in Caffe: a file already in the latest format is reported with an ERROR line and written
unchanged; the exit status is 0 unless reading or upgrading fails. Net upgrades: V1
``layers`` with enum types, deploy ``input``/``input_dim``/``input_shape`` fields (an Input
layer), data-layer transformation fields, BatchNorm's three ``param``s. Solver upgrade: the
``solver_type`` enum becomes the ``type`` string.
"""
from __future__ import annotations

import sys

from google.protobuf import message as _message
from google.protobuf import text_format

from caffe_compat.engine.net.upgrade import UpgradeError, upgrade_net
from caffe_compat.engine.solver.params import SolverParamError, upgrade_solver_param
from caffe_compat.formats import atomic, glog
from caffe_compat.formats.blob_io import ProtoError, read_text_proto
from caffe_compat.proto import caffe_pb2


def _read_binary_net(path: str) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    with open(path, "rb") as f:
        try:
            net.ParseFromString(f.read())
        except _message.DecodeError as exc:
            raise ProtoError(f"{path}: not a binary NetParameter ({exc})") from exc
    return net


def _upgrade(param, upgrade, source: str, tool: str) -> bool:
    before = param.SerializeToString()
    try:
        upgrade(param, source)
    except (UpgradeError, SolverParamError) as exc:
        glog.error(f"Encountered error(s) while upgrading prototxt; see details above. {exc}",
                   f"{tool}.cpp:39")
        return False
    if param.SerializeToString() == before:
        glog.error(f"File already in latest proto format: {source}", f"{tool}.cpp:43")
    return True


def run(argv: list[str], tool: str, kind: str, binary: bool = False) -> int:
    """One upgrade tool: ``tool IN OUT``. ``kind`` is "NetParameter" or "SolverParameter"."""
    argv = sys.argv[1:] if argv is None else argv
    what = "v0_net_proto_file_in net_proto_file_out" if kind == "NetParameter" \
        else "solver_proto_file_in solver_proto_file_out"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {tool} {what}\n\nRewrite an old-format {kind} file in the current "
              f"format (Caffe's {tool}).")
        return 0
    if len(argv) != 2:
        glog.error(f"Usage: {tool} {what}", f"{tool}.cpp:22")
        return 1
    source, target = argv
    message_type = caffe_pb2.NetParameter if kind == "NetParameter" else caffe_pb2.SolverParameter
    try:
        param = _read_binary_net(source) if binary else read_text_proto(source, message_type)
    except (ProtoError, OSError) as exc:
        glog.error(f"Failed to parse input {'binary' if binary else 'text'} file as {kind}: "
                   f"{source} ({exc})", f"{tool}.cpp:30")
        return 2
    upgrade = upgrade_net if kind == "NetParameter" else upgrade_solver_param
    ok = _upgrade(param, upgrade, source, tool)
    if binary:
        atomic.write_bytes(target, param.SerializeToString())
    else:
        atomic.write_text(target, text_format.MessageToString(param))
    glog.info(f"Wrote upgraded {kind} {'binary' if binary else 'text'} proto to {target}",
              f"{tool}.cpp:49")
    return 0 if ok else 1
