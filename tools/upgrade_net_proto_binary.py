#!/usr/bin/env python3
"""``upgrade_net_proto_binary IN OUT``: Caffe's tools/upgrade_net_proto_binary.cpp (see caffe_compat.commands.upgrade_proto).

See caffe_compat/commands/upgrade_net_proto_binary.py (also installed as the `upgrade_net_proto_binary` command).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.upgrade_net_proto_binary import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
