"""SSD's detection scoring of a test net (weiliu89/caffe ``Solver::TestDetection`` and
``ComputeAP`` in ``bbox_util.cpp``), for ``eval_type: "detection"``.

Every output of the test net must be DetectionEvaluate's ``[1, 1, R, 5]`` rows. Over the
``test_iter`` batches the rows are pooled per output and class: the ``[-1, c, n, -1, -1]``
rows add up each class's positives, the ``[item, c, score, tp, fp]`` rows give its ranked
detections (``tp = fp = 0``, a detection of a difficult box left out, is skipped). Each
class's AP follows ``ap_version``, the output's mAP is their mean over every class with a
count row (a class without detections counts 0 and is logged as a warning), and it is
logged as ``Test net output #k: <blob> = <mAP>`` like a classification score. As in the
fork, an output is scored only when some output up to it had detections: a test that
found nothing logs no score.

Values are float32 as in the fork: precision and recall are float quotients, and the AP
sums float32, except that the fork's ``fabs`` is C's double one, so the two integrals add
each double-precision product to the float sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from caffe_compat.formats import glog
from caffe_compat.formats.glog import num

F32 = np.float32
AP_VERSIONS = ("11point", "MaxIntegral", "Integral")
_EPS = F32(1e-6)


class DetectionEvalError(ValueError):
    """The test net's outputs cannot be scored as detections."""


def precision_recall(scores, tp, fp, num_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 precision and recall after each detection, ranked by descending score (a
    stable sort: equal scores keep the order the test produced them in)."""
    order = np.argsort(-np.asarray(scores, dtype=F32), kind="stable")
    tp_sum = np.cumsum(np.asarray(tp, dtype=np.int64)[order])
    fp_sum = np.cumsum(np.asarray(fp, dtype=np.int64)[order])
    if np.any(tp_sum > num_pos):
        raise DetectionEvalError(f"{int(tp_sum[-1])} true positives for {num_pos} "
                                 "ground-truth boxes")
    prec = (tp_sum.astype(F32) / (tp_sum + fp_sum).astype(F32)).astype(F32)
    rec = (tp_sum.astype(F32) / F32(num_pos)).astype(F32)
    return prec, rec


def _eleven_point(prec: np.ndarray, rec: np.ndarray) -> np.float32:
    """VOC2007: the mean over t = 0, 0.1, …, 1 of the best precision at recall >= t (0 where
    none reaches it). The fork's backward scan computes exactly this; its float recall is
    compared with the double t (so a recall of 7/10 in float, just under 0.7, misses 0.7)."""
    rec64 = rec.astype(np.float64)
    ap = F32(0)
    for j in range(10, -1, -1):
        reached = prec[rec64 >= j / 10.0]
        best = reached.max() if len(reached) else F32(0)
        ap = F32(ap + F32(best) / F32(11))
    return ap


def _max_integral(prec: np.ndarray, rec: np.ndarray) -> np.float32:
    """VOC2010+ / ILSVRC: area under the precision envelope (precision made non-increasing
    from the right), recall steps shorter than 1e-6 ignored."""
    ap = F32(0)
    cur_rec, cur_prec = rec[-1], prec[-1]
    for i in range(len(prec) - 2, -1, -1):
        cur_prec = max(prec[i], cur_prec)
        step = abs(F32(cur_rec - rec[i]))
        if step > _EPS:
            ap = F32(np.float64(ap) + np.float64(cur_prec) * np.float64(step))
        cur_rec = rec[i]
    return F32(ap + F32(cur_rec * cur_prec))


def _integral(prec: np.ndarray, rec: np.ndarray) -> np.float32:
    """The plain area: each recall step times the precision where it was reached."""
    ap, prev = F32(0), F32(0)
    for p, r in zip(prec, rec):
        step = abs(F32(r - prev))
        if step > _EPS:
            ap = F32(np.float64(ap) + np.float64(p) * np.float64(step))
        prev = r
    return ap


_AP = {"11point": _eleven_point, "MaxIntegral": _max_integral, "Integral": _integral}


def average_precision(scores, tp, fp, num_pos: int, ap_version: str = "Integral") -> float:
    """One class's AP from its detections' scores and 0/1 ``tp``/``fp`` marks (complements of
    each other) against ``num_pos`` ground-truth boxes: 0 with no detection or no box."""
    if ap_version not in _AP:
        raise DetectionEvalError(f"Unknown ap_version: {ap_version} (known: "
                                 f"{', '.join(AP_VERSIONS)})")
    if len(tp) != len(fp) or any(t != 1 - f for t, f in zip(tp, fp)):
        raise DetectionEvalError("each detection must be exactly one of tp and fp")
    if len(tp) == 0 or num_pos == 0:
        return 0.0
    prec, rec = precision_recall(scores, tp, fp, num_pos)
    return float(_AP[ap_version](prec, rec))


@dataclass
class _OutputTally:
    num_pos: dict[int, int] = field(default_factory=dict)
    ranked: dict[int, list[tuple[float, int, int]]] = field(default_factory=dict)  # score, tp, fp


class DetectionTally:
    """DetectionEvaluate rows of every test batch, pooled per output (``add``), then scored
    and logged (``report``)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.tallies: dict[int, _OutputTally] = {}
        self.detected: set[int] = set()     # outputs with at least one scored detection

    def add(self, outputs: dict) -> None:
        for j, name in enumerate(self.names):
            blob = outputs[name]
            if blob.dim() == 0 or blob.shape[-1] != 5:
                raise DetectionEvalError(
                    f"eval_type \"detection\" scores DetectionEvaluate's [1, 1, R, 5] rows, but "
                    f"test net output '{name}' has shape {list(blob.shape)}")
            rows = blob.detach().to("cpu").float().numpy().reshape(-1, 5)
            self._add_rows(j, rows)

    def _add_rows(self, j: int, rows: np.ndarray) -> None:
        tally = self.tallies.setdefault(j, _OutputTally())
        for item, label, score, tp, fp in rows.tolist():
            label = int(label)
            if int(item) == -1:             # a class's count of ground-truth boxes
                tally.num_pos[label] = tally.num_pos.get(label, 0) + int(score)
            elif int(tp) or int(fp):
                tally.ranked.setdefault(label, []).append((score, int(tp), int(fp)))
                self.detected.add(j)

    def report(self, ap_version: str, per_class: bool) -> list[tuple[str, float]]:
        """(output name, mAP) of each scored output, logged as the fork logs them."""
        scored = []
        for j in range(len(self.detected)):
            if j not in self.detected:
                raise DetectionEvalError(f"Missing output_blob true_pos: {j} (test net output "
                                         f"'{self.names[j]}' had no detection)")
            scored.append((self.names[j], self._mean_ap(self.tallies[j], ap_version, per_class)))
            glog.info(f"    Test net output #{j}: {self.names[j]} = {num(scored[-1][1])}",
                      "solver.cpp:546")
        return scored

    @staticmethod
    def _mean_ap(tally: _OutputTally, ap_version: str, per_class: bool) -> float:
        total = F32(0)
        for label in sorted(tally.num_pos):
            if label not in tally.ranked:
                glog.warning(f"Missing true_pos for label: {label}", "solver.cpp:524")
                continue
            score, tp, fp = zip(*tally.ranked[label])
            ap = F32(average_precision(score, tp, fp, tally.num_pos[label], ap_version))
            total = F32(total + ap)
            if per_class:
                glog.info(f"class{label}: {num(float(ap))}", "solver.cpp:540")
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(F32(total / F32(len(tally.num_pos))))
