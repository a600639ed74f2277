"""The file-format and log tools import without torch; the engine loads on first use."""
from __future__ import annotations

import subprocess
import sys

import pytest


def _loads_torch(statement: str) -> bool:
    code = f"import sys\n{statement}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("statement", [
    "import caffe_compat",
    "import caffe_compat.formats.glog",
    "from caffe_compat.formats import glog; glog.info('x', 'a.cpp:1')",
    "import caffe_compat.commands.logparse",
    "from caffe_compat.commands.logparse import parse_lines; parse_lines([])",
    "import caffe_compat.formats.blob_io, caffe_compat.formats.atomic",
])
def test_format_and_log_modules_import_without_torch(statement):
    assert not _loads_torch(statement)


def test_the_check_sees_torch_when_the_engine_is_used():
    """A guard for the guard: touching a pycaffe name loads the engine."""
    assert _loads_torch("import caffe_compat; caffe_compat.Net")


def test_lazy_names_are_the_real_objects():
    import caffe_compat
    from caffe_compat.pycaffe import Net
    from caffe_compat.engine.layers.base import TEST
    assert caffe_compat.Net is Net and caffe_compat.TEST == TEST
    assert "Net" in dir(caffe_compat)
    with pytest.raises(AttributeError):
        caffe_compat.no_such_name
