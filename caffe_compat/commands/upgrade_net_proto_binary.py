"""``upgrade_net_proto_binary IN OUT``: Caffe's tools/upgrade_net_proto_binary.cpp (see caffe_compat.commands.upgrade_proto)."""
from __future__ import annotations

from caffe_compat.commands.upgrade_proto import run


def main(argv: list[str] | None = None) -> int:
    return run(argv, "upgrade_net_proto_binary", "NetParameter", binary=True)
