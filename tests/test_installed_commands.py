"""Every console script in setup.cfg answers --help from any folder, and the tools/ wrappers
that became commands still run; tools/make_finetune_models.py --help writes nothing."""
from __future__ import annotations

import configparser
import importlib
import subprocess
import sys

import pytest

from fit_utils import ROOT


def _console_scripts() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].splitlines()
    pairs = [line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")]
    return {name.strip(): target.strip() for name, target in pairs}


SCRIPTS = _console_scripts()


def test_the_readme_tools_are_installed():
    for name in ("caffe", "classify", "export", "parse_log", "plot_log", "draw_net",
                 "make_split"):
        assert name in SCRIPTS, name


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_from_any_folder(name, tmp_path, monkeypatch, capsys):
    module, function = SCRIPTS[name].split(":")
    monkeypatch.chdir(tmp_path)
    main = getattr(importlib.import_module(module), function)
    try:
        code = main(["--help"])
    except SystemExit as stop:
        code = stop.code
    assert code == 0
    assert "usage:" in capsys.readouterr().out.lower()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool", ["export", "parse_log", "plot_log", "draw_net", "make_split"])
def test_tool_wrappers_still_run(tool, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_make_finetune_models_help_writes_nothing(tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "models").rglob("*") if p.is_file()}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "make_finetune_models.py"),
                           "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout
    after = {p: p.stat().st_mtime_ns for p in (ROOT / "models").rglob("*") if p.is_file()}
    assert after == before
