"""Resuming a solver from a solverstate: history, iteration, learned weights, data position."""
from __future__ import annotations

import os

import numpy as np
import torch

from caffe_compat.engine import weights
from caffe_compat.engine.solver.snapshot import (SnapshotError, SolverStateData, read_state,
                                                 resolve_learned_net)
from caffe_compat.formats import glog


def restore(solver, state_file: str) -> None:
    """Load a solverstate (Caffe's or ours; ``.h5`` → HDF5) into ``solver``."""
    state_file = os.fspath(state_file)
    state = read_state(state_file)
    check_history(solver, state, state_file)
    steps = len(solver.param.stepvalue)
    if solver.param.lr_policy == "multistep" and state.current_step > steps:
        raise SnapshotError(f"{state_file}: current_step is {state.current_step} but the "
                            f"solver's multistep policy has {steps} stepvalues")
    if state.learned_net:
        weights.copy_from(solver.train_module, resolve_learned_net(state.learned_net, state_file))
    with torch.no_grad():
        for h, arr in zip(solver.history, state.history):
            h.copy_(torch.from_numpy(np.ascontiguousarray(arr)).reshape(h.shape))
    solver.iter = int(state.iter)
    solver.current_step = int(state.current_step)
    seek_data(solver)
    glog.info("SGDSolver: restoring history", "sgd_solver.cpp:296")

def check_history(solver, state: SolverStateData, state_file: str) -> None:
    if len(state.history) != len(solver.history):
        raise SnapshotError(
            f"{state_file}: Incorrect length of history blobs: the file has "
            f"{len(state.history)}, a {solver.param.type} solver for this net needs "
            f"{len(solver.history)} ({solver.updater.rule.num_histories} per learnable param)")
    n = len(solver.learnable_tensors)
    for k, (h, arr) in enumerate(zip(solver.history, state.history)):
        if arr.size != h.numel():
            lp = solver.train_module.learnable_params[k % n]
            raise SnapshotError(f"{state_file}: history blob {k} ({lp.name}) has shape "
                                f"{arr.shape}, the net's param has {tuple(h.shape)}")

def seek_data(solver) -> None:
    """Point data layers at the batches an uninterrupted run would read next.

    Batch k's content (and its crop/mirror draws) is a function of k alone, so a run
    resumed at iteration N continues bit-for-bit: the train net has read N·iter_size
    batches, each test net test_iter batches per test round held before N. (Caffe
    restarts its readers at the first record instead.)
    """
    p = solver.param
    solver.train_module.seek_data(solver.iter * p.iter_size)
    if p.test_interval > 0:
        rounds = (solver.iter + p.test_interval - 1) // p.test_interval
        if not p.test_initialization and solver.iter > 0:
            rounds -= 1
        for module, n in zip(solver.test_modules, p.test_iter):
            module.seek_data(rounds * n)

