"""Caffe's ``Solver::Test``: ``test_iter`` forwards of a test net, outputs averaged."""
from __future__ import annotations

import time

import torch

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


def run_test(solver, test_net_id: int) -> list[float]:
    glog.info(f"Iteration {solver.iter}, Testing net (#{test_net_id})", "solver.cpp:346")
    started = time.perf_counter()
    module = solver.test_modules[test_net_id]
    module.share_trained_layers_with(solver.train_module)
    if solver.test_from_first_batch:
        module.seek_data(0)
    n_iter = solver.param.test_iter[test_net_id]
    sums, loss, outputs = None, None, None
    with torch.no_grad():
        for i in range(n_iter):
            _handle_requests(solver)
            if solver.requested_early_exit:
                break
            keep_all = solver.keep_all_blobs and i == n_iter - 1   # what blobs_ready() reads
            iter_loss, outputs = module.forward_loss(keep_all, **solver.feed(test_net_id + 1))
            flat = [outputs[n].detach().float().reshape(-1) for n in module.output_names]
            flat = torch.cat(flat) if flat else torch.zeros(0, device=solver.device)
            sums = flat.clone() if sums is None else sums.add_(flat)
            if solver.param.test_compute_loss:
                loss = iter_loss if loss is None else loss + iter_loss
    if solver.requested_early_exit:
        glog.info("Test interrupted.", "solver.cpp:394")
        return []
    if outputs is not None:
        solver.blobs_ready(test_net_id + 1, outputs)
    mean_loss = None
    if solver.param.test_compute_loss and loss is not None:
        mean_loss = f32(float(loss) / n_iter)
        glog.info(f"Test loss: {num(mean_loss)}", "solver.cpp:398")
    means = [] if sums is None else (sums / n_iter).tolist()
    names = [n for n in module.output_names for _ in range(outputs[n].numel())] \
        if outputs is not None else []
    log_scores("Test", list(zip(names, means)), module, "solver.cpp:413")
    solver.mean_scores[test_net_id] = means
    scores: dict[str, list[float]] = {}
    for name, value in zip(names, means):
        scores.setdefault(name, []).append(value)
    solver.events.emit(TestDone(solver.iter, test_net_id, scores, dict(module.loss_weights),
                                mean_loss, time.perf_counter() - started))
    return means
