"""Training logs: ours must read like Caffe's, for our parser and for Caffe's own tools.

One module-scoped run trains the golden tiny net (tests/goldens/data, the net and solver that
produced caffe_train.log) with tools/train.py, then resumes it from its iteration-15 snapshot
into the same (appended) log. Checks:
- tools/parse_log.py gives our log and real Caffe's log the same row structure;
- the regexes of Caffe's tools/extra/parse_log.py (caffe-semantics.md §1.9), applied exactly,
  and a port of its algorithm read our log into the same rows as our parser;
- parse_log.sh's awk fields ($9 of lr lines, $11 of Test net output #0/#1 lines);
- the CSV files, the plot, and parser details (other prefixes, nan, several test nets).
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest

from caffe_compat.commands.logparse import parse_lines, parse_log, save_csv_files
from test_cli_train import GOLDEN_DATA, load_tool, run_train

GOLDEN_LOG = GOLDEN_DATA / "caffe_train.log"

# caffe-semantics.md §1.9: the regexes of Caffe's tools/extra/parse_log.py, verbatim.
REGEX_ITERATION = re.compile(r"Iteration (\d+)")
REGEX_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
REGEX_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
REGEX_LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
GLOG_PREFIX = re.compile(r"^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d{6} +\d+ [\w.]+:\d+\] ")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Our log of the golden solver: 30 iterations, then a resume from 15 appended to it."""
    folder = tmp_path_factory.mktemp("golden_run")
    for name in ("color32_lmdb", "color32_leveldb"):        # copies: LevelDB writes on open
        shutil.copytree(GOLDEN_DATA / name, folder / name)
    for name in ("solver.prototxt", "train_val.prototxt"):
        shutil.copy(GOLDEN_DATA / name, folder / name)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert run_train(["--solver", "solver.prototxt", "--no-plot"]) == 0
        fresh = (folder / "snap/tiny.log").read_text()
        assert run_train(["--solver", "solver.prototxt", "--snapshot",
                          "snap/tiny_iter_15.solverstate"]) == 0
    finally:
        os.chdir(cwd)
    appended = folder / "snap/tiny.log"
    fresh_log = folder / "fresh.log"
    fresh_log.write_text(fresh)
    return {"dir": folder, "fresh": fresh_log, "resumed": appended}


# ------------------------------------------------------------------------ structure vs Caffe
def test_golden_caffe_log_rows():
    data = parse_log(GOLDEN_LOG)
    assert [r.iter for r in data.train] == [0, 5, 10, 15, 20, 25, 30]
    assert [list(r.outputs) for r in data.train[:-1]] == [["loss"]] * 6
    assert data.train[-1].outputs == {} and data.train[-1].loss == pytest.approx(0.801585)
    assert [r.lr for r in data.train[:-1]] == [0.01] * 4 + [0.001] * 2
    assert [(r.iter, r.outputs) for r in data.test] == [
        (0, {"accuracy": 0.0666667, "loss": 2.29475}), (10, {"accuracy": 0.2, "loss": 2.03571}),
        (20, {"accuracy": 0.6, "loss": 1.27381}), (30, {"accuracy": 0.566667, "loss": 1.26357})]
    assert data.start == datetime.datetime(2026, 11, 23, 20, 36, 55, 666232)  # I<YYYYMMDD>
    assert data.snapshots == ["snap/tiny_iter_15.caffemodel", "snap/tiny_iter_30.caffemodel"]


def _shape(data):
    train = [(r.iter, tuple(r.outputs), r.lr) for r in data.train]
    test = [(r.iter, r.net, tuple(r.outputs), r.lr) for r in data.test]
    return train, test, data.snapshots, data.solver_states


def test_our_log_has_caffes_row_structure(trained):
    ours, caffe = parse_log(trained["fresh"]), parse_log(GOLDEN_LOG)
    assert _shape(ours) == _shape(caffe)
    assert ours.start is not None and ours.train[0].seconds >= 0


def test_resumed_log_keeps_both_runs(trained):
    data = parse_log(trained["resumed"])
    assert data.restored_from == ["snap/tiny_iter_15.solverstate"]
    assert [r.iter for r in data.train] == [0, 5, 10, 15, 20, 25, 30, 15, 20, 25, 30]
    assert [r.iter for r in data.latest(data.train)] == [0, 5, 10, 15, 20, 25, 30]


# ------------------------------------------------------------------------ Caffe's regexes
def _message_lines(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    first = next(i for i, l in enumerate(lines) if REGEX_ITERATION.search(l))
    return lines[first:]


@pytest.mark.parametrize("which", ["fresh", "resumed"])
def test_every_line_after_first_iteration_has_glog_prefix(trained, which):
    """parse_log.py splits every such line: a blank line raises IndexError in it. (A resumed
    log repeats the solver dump, whose lines it skips as unparseable timestamps.)"""
    lines = _message_lines(trained[which])
    assert all(l.strip() for l in lines), "blank line after the first Iteration line"
    if which == "fresh":
        assert [l for l in lines if not GLOG_PREFIX.match(l)] == []


def test_caffe_regexes_match_our_lines(trained):
    lines = _message_lines(trained["fresh"])
    train = [l for l in lines if "Train net output" in l]
    test = [l for l in lines if "Test net output" in l]
    lr = [l for l in lines if ", lr = " in l]
    assert train and test and lr
    for l in train:
        m = REGEX_TRAIN_OUTPUT.search(l)
        assert m and m.group(2) == "loss" and math.isfinite(float(m.group(3))), l
    for l in test:
        m = REGEX_TEST_OUTPUT.search(l)
        assert m and m.group(2) in ("accuracy", "loss") and float(m.group(3)) >= 0, l
    assert [float(REGEX_LEARNING_RATE.search(l).group(1)) for l in lr] == \
        [0.01] * 4 + [0.001] * 2
    assert sum("] Solving " in l for l in trained["fresh"].read_text().splitlines()) == 1


def test_parse_log_sh_awk_fields(trained):
    """parse_log.sh: ``awk '{print $9}'`` of ', lr = ' lines, ``$11`` of Test net output #0/#1."""
    lines = trained["fresh"].read_text().splitlines()
    lrs = [l.split()[8] for l in lines if ", lr = " in l]
    assert [float(x) for x in lrs] == [0.01] * 4 + [0.001] * 2
    for k, name in ((0, "accuracy"), (1, "loss")):
        fields = [l.split() for l in lines if f"Test net output #{k}" in l]
        assert len(fields) == 4
        assert all(f[8] == name and float(f[10]) >= 0 for f in fields)


# A port of Caffe's tools/extra/parse_log.py + extract_seconds.py (BVLC master), used to show
# that Caffe's own tool reads our log into the rows our parser finds.
def _caffe_datetime(line: str, year: int) -> datetime.datetime:
    tokens = line.strip().split()
    month, day = int(tokens[0][1:3]), int(tokens[0][3:5])
    stamp = tokens[1]
    pos = stamp.rfind(".")
    h, m, s = (int(x) for x in stamp[:pos].split(":"))
    return datetime.datetime(year, month, day, h, m, s, int(stamp[pos + 1:]))


def _caffe_net_output(regex, row, rows, line, iteration, seconds, lr):
    match = regex.search(line)
    if match:
        if not row or row["NumIters"] != iteration:
            if row:
                rows.append(row)
            row = OrderedDict([("NumIters", iteration), ("Seconds", seconds),
                               ("LearningRate", lr)])
        row[match.group(2)] = float(match.group(3))
    if row and len(rows) >= 1 and len(row) == len(rows[0]):
        rows.append(row)
        row = None
    return rows, row


def caffe_parse_log(path: Path):
    year = datetime.datetime.fromtimestamp(os.path.getctime(path)).year
    lines = iter(path.read_text().splitlines(keepends=True))
    start = None
    for line in lines:                       # get_start_time consumes the file up to here
        if "Solving" in line:
            start = _caffe_datetime(line, year)
            break
    iteration, lr = -1, float("nan")
    train, test, train_row, test_row = [], [], None, None
    for line in lines:
        m = REGEX_ITERATION.search(line)
        if m:
            iteration = float(m.group(1))
        if iteration == -1:
            continue
        try:
            now = _caffe_datetime(line, year)
        except ValueError:
            continue
        seconds = (now - start).total_seconds()
        m = REGEX_LEARNING_RATE.search(line)
        if m:
            lr = float(m.group(1))
        train, train_row = _caffe_net_output(REGEX_TRAIN_OUTPUT, train_row, train, line,
                                             iteration, seconds, lr)
        test, test_row = _caffe_net_output(REGEX_TEST_OUTPUT, test_row, test, line,
                                           iteration, seconds, lr)
    for rows in (train, test):
        if len(rows) > 1:
            rows[0]["LearningRate"] = rows[1]["LearningRate"]
    return train, test


@pytest.mark.parametrize("which", ["fresh", "resumed"])
def test_caffe_parse_log_reads_our_log(trained, which):
    caffe_train, caffe_test = caffe_parse_log(trained[which])
    ours = parse_log(trained[which])

    def rows(caffe_rows):
        return [(int(r["NumIters"]), round(r["Seconds"], 6),
                 {k: v for k, v in r.items() if k not in ("NumIters", "Seconds", "LearningRate")})
                for r in caffe_rows]
    assert rows(caffe_train) == [(r.iter, round(r.seconds, 6), r.outputs)
                                 for r in ours.train if r.outputs]
    assert rows(caffe_test) == [(r.iter, round(r.seconds, 6), r.outputs) for r in ours.test]


def test_caffe_parse_log_cannot_read_the_golden_log():
    """Newer glog writes I<YYYYMMDD>: Caffe's extract_seconds fails on it; ours does not."""
    with pytest.raises(ValueError):
        caffe_parse_log(GOLDEN_LOG)
    assert len(parse_log(GOLDEN_LOG).test) == 4


# ------------------------------------------------------------------------ the tools
def test_parse_log_tool_writes_caffe_csvs(trained, tmp_path, capsys):
    tool = load_tool("parse_log")
    assert tool.main([str(trained["fresh"]), str(tmp_path / "csv"), "--verbose"]) == 0
    assert "Wrote " in capsys.readouterr().out
    with open(tmp_path / "csv/fresh.log.train", newline="") as f:
        train = list(csv.reader(f))
    with open(tmp_path / "csv/fresh.log.test", newline="") as f:
        test = list(csv.reader(f))
    assert train[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert [float(r[0]) for r in train[1:]] == [0, 5, 10, 15, 20, 25]
    assert [float(r[2]) for r in train[1:]] == [0.01] * 4 + [0.001] * 2
    assert test[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert [float(r[0]) for r in test[1:]] == [0, 10, 20, 30]
    assert (tmp_path / "csv/fresh.log.train").read_bytes().count(b"\r\n") == 7   # csv.excel


def test_parse_log_tool_on_golden_log(tmp_path):
    assert load_tool("parse_log").main([str(GOLDEN_LOG), str(tmp_path),
                                        "--delimiter", ";"]) == 0
    text = (tmp_path / "caffe_train.log.test").read_text().splitlines()
    assert text[0] == "NumIters;Seconds;LearningRate;accuracy;loss"
    assert text[-1].startswith("30.0;") and text[-1].endswith(";0.566667;1.26357")


def test_parse_log_tool_errors_are_one_line(tmp_path, capsys):
    tool = load_tool("parse_log")
    assert tool.main([str(tmp_path / "none.log"), str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == \
        f"parse_log: error: {tmp_path / 'none.log'}: no such log file"
    (tmp_path / "empty.log").write_text("hello\n")
    assert tool.main([str(tmp_path / "empty.log"), str(tmp_path)]) == 1
    assert "no training or test lines" in capsys.readouterr().err


def test_plot_log_tool(trained, tmp_path, capsys):
    out = tmp_path / "plots/p.png"
    assert load_tool("plot_log").main([str(trained["resumed"]), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(out)
    assert (trained["dir"] / "snap/tiny.png").read_bytes()[:4] == b"\x89PNG"   # from train.py


# ------------------------------------------------------------------------ parser details
def _glog(msg: str, t: str = "12:00:00.000000", day: str = "0102") -> str:
    return f"I{day} {t} 12345 solver.cpp:1] {msg}\n"


def test_parser_details():
    lines = [
        _glog("Solving x"),
        _glog("Iteration 0, Testing net (#0)", "12:00:01.000000"),
        _glog("    Test net output #0: acc = nan", "12:00:02.500000"),
        _glog("Iteration 0, Testing net (#1)"),
        _glog("    Test net output #0: score = 1e-05"),
        _glog("    Test net output #1: score = -2"),
        _glog("Iteration 0 (0 iter/s, 0.1s/10 iters), loss = inf"),
        _glog("    Train net output #0: loss = 3.5 (* 1 = 3.5 loss)"),
        "continuation line of a multi-line message\n",
        "\n",
        _glog("Iteration 0, lr = 0.1"),
    ]
    data = parse_lines(lines, year=2020)
    assert data.start == datetime.datetime(2020, 1, 2, 12, 0, 0)
    assert [(r.net, r.outputs) for r in data.test][1] == (1, {"score": 1e-05, "score_1": -2.0})
    assert math.isnan(data.test[0].outputs["acc"])
    assert data.test[0].seconds == 2.5       # timed at its first output line
    assert data.train[0].loss == math.inf and data.train[0].lr == 0.1
    assert data.test[0].lr == 0.1            # the lr of the iteration the test ran at


def test_parser_new_year_and_multiple_test_nets_csv(tmp_path):
    lines = [_glog("Solving x", day="1231"),
             _glog("Iteration 0, Testing net (#0)", day="1231"),
             _glog("    Test net output #0: accuracy = 0.5", day="1231"),
             _glog("Iteration 0, Testing net (#1)", "00:00:01.000000", day="0101"),
             _glog("    Test net output #0: accuracy = 0.25", "00:00:01.000000", day="0101")]
    data = parse_lines(lines, year=2020)
    assert data.test[1].seconds == pytest.approx(12 * 3600 + 1)
    written = save_csv_files("run.log", str(tmp_path), data)
    assert [os.path.basename(p) for p in written] == ["run.log.test", "run.log.test1"]
