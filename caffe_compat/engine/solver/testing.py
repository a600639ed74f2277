"""Caffe's ``Solver::Test``: ``test_iter`` forwards of a test net, outputs averaged (or, with
the SSD fork's ``eval_type: "detection"``, scored as mAP by ``detection_eval``)."""
from __future__ import annotations

import time

import torch

from caffe_compat.engine.solver.detection_eval import DetectionTally
from caffe_compat.engine.solver.events import NONE, SNAPSHOT, STOP, TestDone
from caffe_compat.engine.solver.update import f32
from caffe_compat.formats import glog
from caffe_compat.formats.glog import num

_MAX_SNAPSHOT_REQUESTS = 8   # a source that always asks for snapshots cannot stall a test


def log_scores(which: str, scores, module, where: str) -> None:
    """Caffe's ``Train/Test net output #k: name = v (* w = v·w loss)`` lines."""
    for k, (name, value) in enumerate(scores):
        w = module.loss_weights.get(name, 0.0)
        suffix = f" (* {num(w)} = {num(f32(w * value))} loss)" if w else ""
        glog.info(f"    {which} net output #{k}: {name} = {num(value)}{suffix}", where)


def _handle_requests(solver) -> None:
    """Between test batches, honour SNAPSHOT/STOP requests as Caffe's Test loop does."""
    for _ in range(_MAX_SNAPSHOT_REQUESTS):
        request = solver.events.requested_action()
        if request == NONE:
            return
        if request == STOP:
            solver.requested_early_exit = True
            return
        if request == SNAPSHOT:
            solver.snapshot()


class _MeanScores:
    """Caffe's classification test: each output element summed over the batches, then
    averaged and logged (``Solver::Test``)."""

    def __init__(self, module, device):
        self.module, self.device = module, device
        self.sums, self.outputs = None, None

    def add(self, outputs) -> None:
        self.outputs = outputs
        flat = [outputs[n].detach().float().reshape(-1) for n in self.module.output_names]
        flat = torch.cat(flat) if flat else torch.zeros(0, device=self.device)
        self.sums = flat.clone() if self.sums is None else self.sums.add_(flat)

    def report(self, n_iter: int) -> tuple[list[float], dict[str, list[float]]]:
        means = [] if self.sums is None else (self.sums / n_iter).tolist()
        names = [n for n in self.module.output_names for _ in range(self.outputs[n].numel())] \
            if self.outputs is not None else []
        log_scores("Test", list(zip(names, means)), self.module, "solver.cpp:413")
        scores: dict[str, list[float]] = {}
        for name, value in zip(names, means):
            scores.setdefault(name, []).append(value)
        return means, scores


class _DetectionScores:
    """SSD's detection test (``Solver::TestDetection``): the mAP of each output."""

    def __init__(self, module, param):
        self.tally = DetectionTally(list(module.output_names))
        self.param = param

    def add(self, outputs) -> None:
        self.tally.add(outputs)

    def report(self, n_iter: int) -> tuple[list[float], dict[str, list[float]]]:
        scored = self.tally.report(self.param.ap_version, self.param.show_per_class_result)
        return [value for _, value in scored], {name: [value] for name, value in scored}


# Where each kind of test logs: BVLC's Solver::Test, and the SSD fork's TestDetection.
_WHERE = {"classification": ("solver.cpp:346", "solver.cpp:394", "solver.cpp:398"),
          "detection": ("solver.cpp:433", "solver.cpp:494", "solver.cpp:499")}


def run_test(solver, test_net_id: int) -> list[float]:
    """``test_iter`` forwards of test net ``test_net_id``, scored by the solver's eval_type;
    logs Caffe's lines and emits TestDone. Returns the logged values."""
    detection = solver.param.eval_type == "detection"
    start_at, interrupted_at, loss_at = _WHERE["detection" if detection else "classification"]
    glog.info(f"Iteration {solver.iter}, Testing net (#{test_net_id})", start_at)
    started = time.perf_counter()
    module = solver.test_modules[test_net_id]
    module.share_trained_layers_with(solver.train_module)
    if solver.test_from_first_batch:
        module.seek_data(0)
    n_iter = solver.param.test_iter[test_net_id]
    tally = _DetectionScores(module, solver.param) if detection else _MeanScores(module, solver.device)
    loss, outputs = None, None
    with torch.no_grad():
        for i in range(n_iter):
            _handle_requests(solver)
            if solver.requested_early_exit:
                break
            keep_all = solver.keep_all_blobs and i == n_iter - 1   # what blobs_ready() reads
            iter_loss, outputs = module.forward_loss(keep_all, **solver.feed(test_net_id + 1))
            tally.add(outputs)
            if solver.param.test_compute_loss:
                loss = iter_loss if loss is None else loss + iter_loss
    if solver.requested_early_exit:
        glog.info("Test interrupted.", interrupted_at)
        return []
    if outputs is not None:
        solver.blobs_ready(test_net_id + 1, outputs)
    mean_loss = None
    if solver.param.test_compute_loss and loss is not None:
        mean_loss = f32(float(loss) / n_iter)
        glog.info(f"Test loss: {num(mean_loss)}", loss_at)
    values, scores = tally.report(n_iter)
    solver.mean_scores[test_net_id] = values
    solver.events.emit(TestDone(solver.iter, test_net_id, scores, dict(module.loss_weights),
                                mean_loss, time.perf_counter() - started))
    return values
