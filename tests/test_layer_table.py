"""README's supported-layer table is the registry's (tools/layer_table.py)."""
import subprocess
import sys
from pathlib import Path

from caffe_compat.commands.layer_table import (REGENERATE, builtin_layers, current_section,
                                               layer_table, readme_section)
from caffe_compat.engine.layers import Layer
from caffe_compat.engine.layers.base import layer_family

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_matches_the_registry():
    section = current_section((ROOT / "README.md").read_text(encoding="utf-8"))
    assert section is not None, "README.md lost its layer-table markers"
    assert section == readme_section(), f"README's layer table is stale: run {REGENERATE}"


def test_every_builtin_type_is_in_the_table_with_its_origin():
    table = layer_table()
    for name, cls in builtin_layers().items():
        cell = f"`{name}`" if cls.origin == "BVLC" else f"`{name}` (from {cls.origin})"
        assert cell in table
    assert "`PriorBox` (from weiliu89/caffe branch ssd)" in table


def test_defaults_come_from_the_module_name_and_bvlc():
    cls = type("Thing", (Layer,), {"type": "Thing", "__module__": "caffe_compat.engine.layers.spp"})
    assert layer_family(cls) == "spp" and cls.origin == "BVLC"
    data = type("D", (Layer,), {"type": "D", "__module__": "caffe_compat.data.layers"})
    assert layer_family(data) == "data"


def test_tool_check_reports_a_stale_readme(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text(readme_section().replace("`ReLU6`", "`ReLU7`"))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "layer_table.py"), "--check",
                             "--readme", str(stale)], capture_output=True, text=True)
    assert result.returncode == 1 and REGENERATE in result.stderr
    subprocess.run([sys.executable, str(ROOT / "tools" / "layer_table.py"), "--write",
                    "--readme", str(stale)], check=True, capture_output=True)
    assert stale.read_text() == readme_section()
