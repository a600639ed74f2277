"""The paper-reproduction pipeline: tables and figures from records, the run protocol, resuming.

Tables are checked on synthetic records whose mean and std are known in closed form; the
protocol runs a tiny net on the real 40/10 splits of data/fashion50 (a few seconds); the slow
tier runs ``tools/reproduce_paper.py --runs 2 --epochs 5`` on alexnet_64.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from experiments.reproduce import plots, protocol, runs, tables

REPO = Path(__file__).resolve().parents[1]

TINY_NET = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true crop_size: 64 scale: 0.0078125
                    mean_file: "data/fashion50_lmdb/mean.binaryproto" }
  data_param { source: "data/fashion50_lmdb/train" backend: LMDB batch_size: 20 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 64 scale: 0.0078125
                    mean_file: "data/fashion50_lmdb/mean.binaryproto" }
  data_param { source: "data/fashion50_lmdb/test" backend: LMDB batch_size: 25 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 5 stride: 4 weight_filler { type: "msra" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "drop1" type: "Dropout" bottom: "conv1" top: "conv1"
  dropout_param { dropout_ratio: 0.3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""

TINY_SOLVER = """
net: "train_val.prototxt"
test_iter: 4
test_interval: 20
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.5
stepsize: 30
max_iter: 100
type: "SGD"
"""


@pytest.fixture
def tiny_model(tmp_path):
    folder = tmp_path / "models" / "tiny_64"
    folder.mkdir(parents=True)
    (folder / "train_val.prototxt").write_text(TINY_NET)
    (folder / "solver.prototxt").write_text(TINY_SOLVER)
    return folder


def _tool():
    spec = importlib.util.spec_from_file_location("reproduce_paper",
                                                  REPO / "tools" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strip(record):
    """The per-epoch numbers of a run record, without its timings."""
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in record["records"]]


# ---------------------------------------------------------------- tables and figures


def synthetic(model, seed, epochs=50, acc_offset=0.0, acc_step=0.1):
    """Run ``seed`` of ``model``: accuracy 0.5 + 0.005·e + acc_step·seed + acc_offset,
    test loss 1/e + 0.1·seed, train loss 2/e + 0.2·seed."""
    recs = [{"epoch": e, "iter": 20 * e, "train_loss": 2 / e + 0.2 * seed,
             "train_total_loss": 2 / e + 0.2 * seed, "test_loss": 1 / e + 0.1 * seed,
             "test_accuracy": 0.5 + 0.005 * e + acc_step * seed + acc_offset, "lr": 0.01,
             "train_seconds": 1.0, "seconds": 1.5} for e in range(1, epochs + 1)]
    return {"key": {"model": model, "seed": seed}, "model": model, "seed": seed,
            "epochs": epochs, "records": recs, "seconds": 1.5 * epochs,
            "train_images_per_second": 400.0, "solver": "SGD"}


@pytest.mark.parametrize("epochs, columns", [(50, [10, 20, 30, 40, 50]), (5, [1, 2, 3, 4, 5]),
                                             (25, [10, 20, 25]), (8, [2, 3, 5, 6, 8]),
                                             (1, [1])])
def test_epoch_columns(epochs, columns):
    assert tables.epoch_columns(epochs) == columns


def test_table_cells_are_mean_and_sample_std_over_runs():
    # three runs offset by 0, 0.1, 0.2: mean = base + 0.1, sample std = 0.1 exactly
    runs = [synthetic("m_64", s) for s in range(3)]
    text = tables.model_table(runs)
    lines = text.splitlines()
    assert lines[0] == "| | 10 | 20 | 30 | 40 | 50 |"
    # epoch 10: accuracy 0.55 + 0.1 = 65%, test loss 0.1 + 0.1, train loss 0.2 + 0.2
    assert lines[2].startswith("| Test Loss | 0.200 ± 0.100 | 0.150 ± 0.100 |")
    assert lines[3].startswith("| Train Loss | 0.400 ± 0.200 | 0.300 ± 0.200 |")
    assert lines[4] == ("| Accuracy | 65.0 ± 10.0% | 70.0 ± 10.0% | 75.0 ± 10.0% | "
                        "80.0 ± 10.0% | 85.0 ± 10.0% |")
    mean, std = tables.summarize(runs, "test_accuracy")
    assert mean[49] == pytest.approx(0.85) and std[49] == pytest.approx(0.1)


def test_single_run_shows_its_value_alone():
    text = tables.model_table([synthetic("m_64", 0, epochs=5)])
    assert "| Accuracy | 50.5% | 51.0% | 51.5% | 52.0% | 52.5% |" in text


def test_comparison_says_plainly_when_landmark_model_loses():
    # vgg16_landmark 10 points below AlexNet on every split (paired), tiny spread
    records = {"vgg16_landmark_64": [synthetic("vgg16_landmark_64", s, acc_step=0.001)
                                     for s in range(3)],
               "alexnet_64": [synthetic("alexnet_64", s, acc_offset=0.1, acc_step=0.001)
                              for s in range(3)]}
    text = tables.table1_markdown(records)
    assert "**vgg16_landmark_64 does not beat alexnet_64**" in text
    assert "-10.0 ± 0.0 points (paired by split seed, 3 runs)" in text
    assert "| AlexNet: accuracy at the last epoch | 87.5% | 85.1 ± 0.1% (alexnet_64, 3 runs, " \
           "epoch 50) |" in text
    assert "| Accuracy | 18% | 71% | 83% | 87% | 92% |" in text      # the paper's Table 1


def test_comparison_verdicts_beats_and_noise():
    land = [synthetic("vgg16_landmark_64", s, acc_step=0.001) for s in range(3)]
    alex = [synthetic("alexnet_64", s, acc_offset=-0.05, acc_step=0.001) for s in range(3)]
    assert "**vgg16_landmark_64 beats alexnet_64**" in tables.comparison_markdown(
        {"vgg16_landmark_64": land, "alexnet_64": alex})
    noisy = [synthetic("alexnet_64", s, acc_offset=-0.01 - 0.1 * (s == 0) + 0.1 * (s == 1),
                       acc_step=0.001) for s in range(3)]
    assert "does not clearly beat" in tables.comparison_markdown(
        {"vgg16_landmark_64": land, "alexnet_64": noisy})


def test_records_csv_and_figures(tmp_path):
    records = {"vgg16_landmark_64": [synthetic("vgg16_landmark_64", s) for s in range(2)],
               "alexnet_64": [synthetic("alexnet_64", s) for s in range(2)]}
    rows = tables.records_csv(records).splitlines()
    assert rows[0].startswith("model,seed,epoch,") and len(rows) == 1 + 4 * 50
    for path in (plots.plot_loss(records, tmp_path / "fig1_loss.png"),
                 plots.plot_accuracy(records, tmp_path / "fig2_accuracy.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_family_of_fine_tuned_folders():
    assert tables.family("vgg16_landmark_64") == "vgg16_landmark"
    assert tables.family("vgg16_landmark_64_finetune") == "vgg16_landmark"
    assert tables.family("vgg16_landmark_64_finetune_lw0") == "vgg16_landmark_lw0"
    assert tables.family("alexnet_64_finetune") == "alexnet"


def test_confidence_interval_closed_form():
    mean, lo, hi = tables.confidence_interval([0.1, 0.3])   # std 0.1414, t(1) = 12.706
    assert mean == pytest.approx(0.2)
    assert hi - mean == pytest.approx(12.706 * 0.1 * 2 ** 0.5 / 2 ** 0.5)
    assert mean - lo == pytest.approx(hi - mean)
    assert tables.confidence_interval([0.5])[1] != tables.confidence_interval([0.5])[1]  # nan


def test_paired_table_lists_every_pair_run():
    def runs(model, offset):
        return [synthetic(model, s, acc_offset=offset + 0.01 * s * s, acc_step=0.0)
                for s in range(4)]
    records = {"vgg16_landmark_64_finetune": runs("vgg16_landmark_64_finetune", 0.05),
               "alexnet_64_finetune": runs("alexnet_64_finetune", 0.0),
               "vgg16_landmark_64_finetune_lw0": runs("vgg16_landmark_64_finetune_lw0", 0.05)}
    text = tables.table1_markdown(records)
    # landmark − AlexNet: 5 points on every split (the per-seed offsets cancel), CI collapses
    assert "| vgg16_landmark_64_finetune − alexnet_64_finetune | 4 | +5.0 [+5.0, +5.0] |" in text
    assert "| vgg16_landmark_64_finetune − vgg16_landmark_64_finetune_lw0 | 4 | +0.0" in text
    assert "− vgg16_64" not in text                       # that pair was not run
    assert "Landmark supervision (loss_weight 0.005 vs 0): " in text


def test_solver_weights_are_used_and_a_missing_one_names_the_fix(tiny_model, tmp_path):
    solver = tiny_model / "solver.prototxt"
    solver.write_text(TINY_SOLVER + 'weights: "pre.caffemodel"\n')
    with pytest.raises(protocol.ProtocolError, match="tools/pretrain.py"):
        protocol.plan_run(tiny_model, 0, 1, tmp_path / "work")
    (tiny_model / "pre.caffemodel").write_bytes(b"")       # beside the solver file
    plan = protocol.plan_run(tiny_model, 0, 1, tmp_path / "work")
    assert list(plan.solver_param.weights) == [str((tiny_model / "pre.caffemodel").resolve())]
    assert plan.key["weights"] == "pre.caffemodel"


def test_load_records_by_model_and_seed(tmp_path):
    for s in (1, 0):
        protocol.write_json(tmp_path / "records" / "a_64" / f"seed{s}.json", synthetic("a_64", s))
    loaded = tables.load_records(tmp_path)
    assert list(loaded) == ["a_64"] and [r["seed"] for r in loaded["a_64"]] == [0, 1]


# ------------------------------------------------------------------------ protocol


def test_plan_rewrites_sources_in_memory(tiny_model, tmp_path):
    plan = protocol.plan_run(tiny_model, 3, 2, tmp_path / "work")
    data = [lp for lp in plan.solver_param.net_param.layer if lp.type == "Data"]
    assert {lp.data_param.source for lp in data} == {str(plan.data.train_db),
                                                      str(plan.data.test_db)}
    assert {lp.transform_param.mean_file for lp in data} == {str(plan.data.mean)}
    assert "seed3" in str(plan.data.train_db) and "size72" in str(plan.data.train_db)
    assert (plan.data.n_train, plan.data.n_test) == (400, 100)
    assert (plan.iters_per_epoch, plan.test_iter) == (20, 4)
    assert plan.solver_param.random_seed == 3 and not plan.solver_param.HasField("net")
    assert (plan.loss_top, plan.accuracy_top) == ("loss", "accuracy")
    assert "fashion50_lmdb" in (tiny_model / "train_val.prototxt").read_text()   # file untouched


def test_plan_errors_name_the_fix(tmp_path):
    folder = tmp_path / "nosolver"
    folder.mkdir()
    with pytest.raises(protocol.ProtocolError, match="solver.prototxt"):
        protocol.plan_run(folder, 0, 1, tmp_path / "work")


MODELS_WITH_SOLVER = sorted(p.parent.name for p in REPO.glob("models/*/solver.prototxt"))


@pytest.mark.parametrize("model", MODELS_WITH_SOLVER)
def test_every_model_folder_fits_the_protocol(model, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    weights = None
    if "_finetune" in model:          # names a pretrained caffemodel CI does not have
        weights = work / "pretrained.caffemodel"
        weights.write_bytes(b"")
    plan = protocol.plan_run(REPO / "models" / model, 0, 1, work, weights)
    assert plan.iters_per_epoch * plan.solver_param.iter_size * min(
        lp.data_param.batch_size for lp in plan.solver_param.net_param.layer
        if lp.type == "Data") >= 1
    assert plan.loss_top and plan.accuracy_top


def test_interrupted_run_resumes_bit_for_bit(tiny_model, tmp_path):
    work = tmp_path / "work"
    ref, how = runs.run_once(tiny_model, 1, 3, work, tmp_path / "ref.json")
    assert how == "trained" and len(ref["records"]) == 3

    def kill_after_epoch_2(rec):
        if rec["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.run_once(tiny_model, 1, 3, work, tmp_path / "b.json", on_epoch=kill_after_epoch_2)
    assert not (tmp_path / "b.json").exists()
    again, how = runs.run_once(tiny_model, 1, 3, work, tmp_path / "b.json")
    assert how == "resumed" and again["resumed_at_epoch"] == 2
    assert _strip(again) == _strip(ref)
    assert runs.run_once(tiny_model, 1, 3, work, tmp_path / "b.json")[1] == "done"


def test_killed_reproduction_continues(tiny_model, tmp_path, monkeypatch, capsys):
    tool = _tool()
    args = ["--models", str(tiny_model), "--runs", "2", "--epochs", "3", "--threads", "1"]
    assert tool.main(args + ["--out", str(tmp_path / "ref")]) == 0
    calls = {"n": 0}
    real_record = runs.EpochRecorder._record

    def dies_in_run_2(self, event):     # seed 0: tests 1-3; seed 1: killed in epoch 2's test
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_record(self, event)

    monkeypatch.setattr(runs.EpochRecorder, "_record", dies_in_run_2)
    out = tmp_path / "out"
    assert tool.main(args + ["--out", str(out)]) == 130
    assert (out / "records" / "tiny_64" / "seed0.json").is_file()
    assert not (out / "records" / "tiny_64" / "seed1.json").exists()
    monkeypatch.setattr(runs.EpochRecorder, "_record", real_record)
    capsys.readouterr()
    assert tool.main(args + ["--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "tiny_64 seed 0: already done" in said
    assert "resumed from its epoch-1 snapshot" in said
    for seed in (0, 1):
        name = f"records/tiny_64/seed{seed}.json"
        assert _strip(json.loads((out / name).read_text())) == \
            _strip(json.loads((tmp_path / "ref" / name).read_text()))
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["invocations"]) == 2 and "ended" not in meta["invocations"][0]
    table = (out / "table1.md").read_text()
    assert "## tiny_64: 2 runs × 3 epochs" in table and "| | 1 | 2 | 3 |" in table


def test_seed_ranges_fill_one_results_folder(tiny_model, tmp_path):
    tool = _tool()
    out = tmp_path / "out"
    base = ["--models", str(tiny_model), "--epochs", "1", "--threads", "1", "--out", str(out)]
    assert tool.main(base + ["--runs", "1", "--first-seed", "1"]) == 0
    assert tool.main(base + ["--runs", "1"]) == 0
    assert sorted(p.name for p in (out / "records" / "tiny_64").iterdir()) == \
        ["seed0.json", "seed1.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert [("--first-seed" in i["command"], "ended" in i) for i in meta["invocations"]] == \
        [(True, True), (False, True)]
    assert "## tiny_64: 2 runs × 1 epochs (split seeds 0, 1)" in (out / "table1.md").read_text()


@pytest.mark.slow
def test_short_reproduction_on_alexnet_64(tmp_path):
    if not (REPO / "models" / "alexnet_64" / "solver.prototxt").is_file():
        pytest.skip("models/alexnet_64/solver.prototxt not written yet")
    tool = _tool()
    out = tmp_path / "out"
    assert tool.main(["--models", "alexnet_64", "--runs", "2", "--epochs", "5",
                      "--input-size", "64", "--out", str(out), "--threads", "1"]) == 0
    runs = tables.load_records(out)["alexnet_64"]
    assert [r["seed"] for r in runs] == [0, 1] and all(len(r["records"]) == 5 for r in runs)
    table = (out / "table1.md").read_text()
    assert "## alexnet_64: 2 runs × 5 epochs" in table and "| | 1 | 2 | 3 | 4 | 5 |" in table
    for name in ("fig1_loss.png", "fig2_accuracy.png", "records.csv"):
        assert (out / name).stat().st_size > 0


def test_invocations_started_in_one_second_stay_apart(tmp_path):
    tool = _tool()
    meta = tmp_path / "meta.json"
    first = {"command": "python tools/reproduce_paper.py", "started": "2026-12-02T13:10:44"}
    tool.record_invocation(meta, {**first, "id": "a"})
    tool.record_invocation(meta, {**first, "id": "b"})            # a resume, same second
    tool.record_invocation(meta, {**first, "id": "a", "ended": "2026-12-02T13:10:50"})
    entries = json.loads(meta.read_text())["invocations"]
    assert [(e["id"], "ended" in e) for e in entries] == [("a", True), ("b", False)]
    old = tmp_path / "old.json"                                   # written before ids
    tool.record_invocation(old, first)
    tool.record_invocation(old, {**first, "ended": "x"})
    assert json.loads(old.read_text())["invocations"] == [{**first, "ended": "x"}]


def test_precision_and_layout_enter_the_key_and_the_arithmetic(tiny_model, tmp_path):
    work = tmp_path / "work"
    fp32, _ = runs.run_once(tiny_model, 1, 2, work, tmp_path / "fp32.json")
    assert "precision" not in fp32["key"] and fp32["precision"] == "fp32"   # old keys still match
    bf16, how = runs.run_once(tiny_model, 1, 2, work, tmp_path / "bf16.json", precision="bf16")
    assert how == "trained" and bf16["key"]["precision"] == "bf16"
    # autocast really ran: bf16 rounding moves the losses, but not far
    a, b = (np.array([r["train_loss"] for r in rec["records"]]) for rec in (fp32, bf16))
    assert not np.array_equal(a, b) and np.allclose(a, b, rtol=0.05)
    nhwc, _ = runs.run_once(tiny_model, 1, 2, work, tmp_path / "nhwc.json", layout="nhwc")
    assert nhwc["key"]["layout"] == "nhwc"
    c = np.array([r["train_loss"] for r in nhwc["records"]])
    # not bit-equal: the Dropout after conv1 draws its mask in the blob's memory order
    assert not np.array_equal(c, a) and np.allclose(c, a, rtol=0.1)
    with pytest.raises(protocol.ProtocolError, match="another protocol"):
        runs.run_once(tiny_model, 1, 2, work, tmp_path / "fp32.json", precision="bf16")


def test_the_pretraining_line_says_when_its_last_test_ran():
    last_test = _tool()._last_test
    info = {"epochs": 12.0, "train_images": 59500, "test_images": 10000, "precision": "bf16",
            "tests": [{"iter": 10230, "accuracy": 0.9011}]}
    assert last_test(info) == "90.11% on the 10,000 t10k images after epoch 11, bf16"
    info["tests"].append({"iter": 11156, "accuracy": 0.9039})
    assert last_test(info).endswith("images at the end, bf16")
    assert last_test(dict(info, tests=[])) == "no t10k test"
