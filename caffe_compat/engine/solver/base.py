"""The solver loop (Caffe's ``Solver::Step``/``Solve`` and ``SGDSolver::ApplyUpdate``).

One iteration, as in solver.cpp:
  1. clear the param diffs;
  2. test when ``test_interval > 0 and iter % test_interval == 0 and (iter > 0 or
     test_initialization)``;
  3. ``iter_size`` × forward+backward, diffs accumulating; loss = mean over the passes;
  4. smooth the loss (``average_loss``), display;
  5. ApplyUpdate: rate from the lr policy; clip the raw accumulated diffs; then per param:
     normalise by iter_size, regularise (L2/L1 with weight_decay·decay_mult), turn the diff
     into the update with the type's rule (rate·lr_mult), ``w ← w − update``; ``iter += 1``;
  6. snapshot when ``snapshot > 0 and iter % snapshot == 0``.

Parameters whose (lr_mult, decay_mult) agree are updated together with ``torch._foreach``
ops, in place; the train net runs on tensors (Input blobs are taken from the pycaffe host
arrays with ``torch.from_numpy``, no copy on the CPU). The update rule of each solver type
lives in ``updates.py``; ``api.py`` has pycaffe's ``get_solver`` and typed classes.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from google.protobuf import text_format

from caffe_compat.engine import distributed, mode, rng, weights
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.proto import caffe_pb2
from caffe_compat.pycaffe import Net
from caffe_compat.formats import glog
from caffe_compat.formats.glog import num
from caffe_compat.engine.solver.lr_policy import learning_rate
from caffe_compat.engine.solver.params import (SolverParamError, read_solver_param, test_net_specs,
                                        train_net_spec, upgrade_solver_param, validate)
from caffe_compat.engine.solver.snapshot import (HDF5, SnapshotError, SolverStateData, model_extension,
                                          read_state, resolve_learned_net, snapshot_filename,
                                          state_extension, write_model, write_state)
from caffe_compat.engine.solver.updates import UpdateRule, rule_class

# Caffe's SolverAction: what an action_request callback (signal handlers) may ask for.
NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the iteration and layer."""


@dataclass
class _Group:
    """Learnable params sharing (lr_mult, decay_mult): updated by one set of foreach ops."""
    index: list[int]
    lr_mult: float
    decay_mult: float
    weights: list[torch.Tensor]
    history: list[list[torch.Tensor]]   # [k][j]: k-th history of the group's j-th param


def _f32(x: float) -> float:
    return float(np.float32(x))


class Solver:
    """A Caffe solver over NetModules; ``solver.net``/``test_nets`` are pycaffe ``Net`` views.

    Build from a solver prototxt path or a SolverParameter. Subclasses in ``api.py``
    (``SGDSolver``, ``AdamSolver``, ...) set ``solver_type`` to force the update rule, as
    pycaffe's typed constructors do; otherwise the file's ``type`` decides.
    """

    solver_type: str | None = None

    def __init__(self, param: "str | os.PathLike[str] | caffe_pb2.SolverParameter",
                 source: str | None = None):
        self.param, self.source = self._read_param(param, source)
        glog.info("Initializing solver from parameters: \n"
                  + text_format.MessageToString(self.param), "solver.cpp:48")
        self.iter = 0
        self.current_step = 0
        self.learning_rate = 0.0
        self.smoothed_loss = 0.0
        self.loss = math.nan          # the last iteration's loss (mean over iter_size)
        self._losses: list[float] = []
        self.requested_early_exit = False
        self.action_request: Callable[[], str] | None = None   # SIGINT/SIGHUP handlers
        self.iteration_hooks: list[Callable[["Solver"], None]] = []
        self._callbacks: list[tuple[Callable | None, Callable | None]] = []
        self._check_snapshot_writable()
        if self.param.random_seed >= 0:
            rng.set_seed(self.param.random_seed)
        self.device = mode.device()
        self.train_module = self._init_train_net()
        self.test_modules = self._init_test_nets()
        self._load_weights_field()
        self.net = Net.from_module(self.train_module)
        self.test_nets = [Net.from_module(m) for m in self.test_modules]
        self.mean_scores: list[list[float]] = [[] for _ in self.test_modules]
        self.rule: UpdateRule = rule_class(self.param.type)(self.param)
        self._params = [lp.tensor for lp in self.train_module.learnable_params]
        self.history = [torch.zeros_like(p, memory_format=torch.contiguous_format)
                        for _ in range(self.rule.num_histories) for p in self._params]
        self._groups = self._make_groups()
        self._zero_diffs: dict[int, torch.Tensor] = {}
        distributed.attach(self)
        glog.info("Solver scaffolding done.", "solver.cpp:63")

    # -- construction ----------------------------------------------------------------
    def _read_param(self, param, source):
        if isinstance(param, (str, os.PathLike)):
            path = os.fspath(param)
            return read_solver_param(path, self.solver_type), path
        if not isinstance(param, caffe_pb2.SolverParameter):
            raise TypeError("Solver(...) takes a solver prototxt path or a SolverParameter, "
                            f"got {type(param).__name__}")
        copy = caffe_pb2.SolverParameter()
        copy.CopyFrom(param)
        name = source or "<SolverParameter>"
        upgrade_solver_param(copy, name)
        if self.solver_type is not None:
            copy.type = self.solver_type
        validate(copy, name)
        return copy, source

    def _check_snapshot_writable(self) -> None:
        """Caffe's CheckSnapshotWritePermissions (only when periodic snapshots are on)."""
        if self.param.snapshot <= 0 or not distributed.is_root():   # only the root writes
            return
        if not self.param.HasField("snapshot_prefix"):
            raise SolverParamError(f"{self.source or '<solver>'}: snapshot is set but "
                                   "snapshot_prefix is not")
        probe = snapshot_filename(self.param.snapshot_prefix, self.iter, ".tempfile")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise SolverParamError(
                f"{self.source or '<solver>'}: Cannot write to snapshot prefix "
                f"'{self.param.snapshot_prefix}' ({exc.strerror}). Make sure that the "
                "directory exists and is writeable.") from None

    def _build(self, spec) -> NetModule:
        return build_net(spec.param, spec.state.phase, source=spec.source,
                         state=spec.state).to(self.device)

    def _init_train_net(self) -> NetModule:
        spec = train_net_spec(self.param, self.source)
        glog.info(f"Creating training net from {spec.description}", "solver.cpp:94")
        return self._build(spec)

    def _init_test_nets(self) -> list[NetModule]:
        modules = []
        for i, spec in enumerate(test_net_specs(self.param, self.source)):
            glog.info(f"Creating test net (#{i}) specified by {spec.description}",
                      "solver.cpp:184")
            modules.append(self._build(spec))
        return modules

    def _load_weights_field(self) -> None:
        """The solver's ``weights`` entries (comma lists allowed) go into every net by name."""
        for entry in self.param.weights:
            for path in filter(None, (p.strip() for p in entry.split(","))):
                for module in [self.train_module, *self.test_modules]:
                    weights.copy_from(module, path)

    def _make_groups(self) -> list[_Group]:
        by_key: dict[tuple[float, float], list[int]] = {}
        for i, lp in enumerate(self.train_module.learnable_params):
            by_key.setdefault((lp.lr_mult, lp.decay_mult), []).append(i)
        n = len(self._params)
        return [_Group(idx, lr, dm, [self._params[i] for i in idx],
                       [[self.history[k * n + i] for i in idx]
                        for k in range(self.rule.num_histories)])
                for (lr, dm), idx in by_key.items()]

    # -- pycaffe surface -------------------------------------------------------------
    def add_callback(self, on_start: Callable[[], None] | None = None,
                     on_gradients_ready: Callable[[], None] | None = None) -> None:
        """pycaffe's ``solver.add_callback(on_start, on_gradients_ready)``."""
        self._callbacks.append((on_start, on_gradients_ready))

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's Step), testing and snapshotting on schedule."""
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        average_loss = self.param.average_loss
        self._losses = []
        self.smoothed_loss = 0.0
        self._timer, self._iterations_last = time.perf_counter(), self.iter
        outputs = None
        while self.iter < stop_iter:
            self._clear_param_diffs()
            if self._test_due():
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self._callbacks:
                if on_start:
                    on_start()
            display = self.param.display > 0 and self.iter % self.param.display == 0
            feed = self._feed(self.net)
            loss, outputs = self._forward_backward(feed)
            self.loss = loss
            if not math.isfinite(loss):
                self._fail_non_finite(loss, feed)
            self._update_smoothed_loss(loss, start_iter, average_loss)
            if display:
                self._display(outputs)
            for _, on_ready in self._callbacks:
                if on_ready:
                    on_ready()
            self.apply_update(display)
            self.iter += 1
            request = self._requested_action()
            if (self.param.snapshot > 0 and self.iter % self.param.snapshot == 0) or \
                    request == SNAPSHOT:
                self.snapshot()
            for hook in self.iteration_hooks:
                hook(self)
            if request == STOP:
                self.requested_early_exit = True
                break
        if outputs is not None:
            self._store_outputs(self.net, outputs)

    def solve(self, resume_file: str | None = None) -> None:
        """Caffe's Solve: optional restore, Step to max_iter, final snapshot/display/test."""
        glog.info(f"Solving {self.train_module.name}", "solver.cpp:282")
        glog.info(f"Learning Rate Policy: {self.param.lr_policy}", "solver.cpp:283")
        self.requested_early_exit = False
        if resume_file:
            glog.info(f"Restoring previous solver status from {resume_file}", "solver.cpp:291")
            self.restore(resume_file)
        start_iter = self.iter
        self.step(self.param.max_iter - self.iter)
        p = self.param
        if p.snapshot_after_train and (p.snapshot <= 0 or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            glog.info("Optimization stopped early.", "solver.cpp:306")
            return
        if p.display > 0 and self.iter % p.display == 0:
            with torch.no_grad():
                loss, outputs = self.train_module.forward_loss(**self._feed(self.net))
            self._update_smoothed_loss(float(loss), start_iter, p.average_loss)
            self._store_outputs(self.net, outputs)
            glog.info(f"Iteration {self.iter}, loss = {num(self.smoothed_loss)}", "solver.cpp:320")
        if p.test_interval > 0 and self.iter % p.test_interval == 0 and distributed.is_root():
            self.test_all()
        glog.info("Optimization Done.", "solver.cpp:325")

    # -- one iteration ---------------------------------------------------------------
    def _clear_param_diffs(self) -> None:
        for p in self._params:
            p.grad = None    # autograd writes fresh diffs; the first pass needs no zero fill

    def _test_due(self) -> bool:
        p = self.param
        return p.test_interval > 0 and self.iter % p.test_interval == 0 and \
            (self.iter > 0 or p.test_initialization) and bool(self.test_modules) and \
            distributed.is_root()

    def _feed(self, net: Net) -> dict[str, torch.Tensor]:
        """The Input blobs' host arrays as tensors (shared memory on the CPU)."""
        out = {}
        for name in net.module.input_names:
            t = torch.from_numpy(net.blobs[name].data)
            out[name] = t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)
        return out

    def _forward_backward(self, feed: Mapping[str, torch.Tensor]
                          ) -> tuple[float, dict[str, torch.Tensor]]:
        total, outputs = None, {}
        for _ in range(self.param.iter_size):
            loss, outputs = self.train_module.forward_loss(**feed)
            if loss.requires_grad:
                loss.backward()
            loss = loss.detach()
            total = loss if total is None else total + loss
        return _f32(float(total) / self.param.iter_size), outputs

    def _update_smoothed_loss(self, loss: float, start_iter: int, average_loss: int) -> None:
        """Caffe's UpdateSmoothedLoss: running mean until full, then a ring buffer."""
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = _f32((self.smoothed_loss * (size - 1) + loss) / size)
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss = _f32(self.smoothed_loss
                                      + (loss - self._losses[idx]) / average_loss)
            self._losses[idx] = loss

    def _display(self, outputs: Mapping[str, torch.Tensor]) -> None:
        lapse = time.perf_counter() - self._timer
        per_s = (self.iter - self._iterations_last) / (lapse or 1.0)
        glog.info(f"Iteration {self.iter} ({num(per_s)} iter/s, {num(lapse)}s/"
                  f"{self.param.display} iters), loss = {num(self.smoothed_loss)}",
                  "solver.cpp:243")
        self._timer, self._iterations_last = time.perf_counter(), self.iter
        scores = [(name, v) for name in self.train_module.output_names
                  for v in outputs[name].detach().float().reshape(-1).tolist()]
        self._log_scores("Train", scores, self.train_module, "solver.cpp:259")

    @staticmethod
    def _log_scores(which: str, scores, module: NetModule, where: str) -> None:
        for k, (name, value) in enumerate(scores):
            w = module.loss_weights.get(name, 0.0)
            suffix = f" (* {num(w)} = {num(_f32(w * value))} loss)" if w else ""
            glog.info(f"    {which} net output #{k}: {name} = {num(value)}{suffix}", where)

    def apply_update(self, display: bool = False) -> None:
        """SGDSolver::ApplyUpdate on the current diffs: clip, normalise, regularise, update."""
        rate, self.current_step = learning_rate(
            self.param, self.iter, self.current_step,
            log=lambda msg: glog.info(msg, "sgd_solver.cpp:53"))
        self.learning_rate = rate
        if display:
            glog.info(f"Iteration {self.iter}, lr = {num(rate)}", "sgd_solver.cpp:106")
        with torch.no_grad():
            diffs = self._diffs()
            self._clip(diffs)
            if self.param.iter_size > 1:
                torch._foreach_mul_(diffs, _f32(1.0 / self.param.iter_size))
            for g in self._groups:
                gd = [diffs[i] for i in g.index]
                self._regularize(gd, g)
                self.rule.compute(gd, g.history, _f32(rate * g.lr_mult), self.iter)
                if g.lr_mult != 0:      # lr 0 makes every rule's update exactly 0
                    torch._foreach_sub_(g.weights, gd)

    def _diffs(self) -> list[torch.Tensor]:
        """Each learnable param's diff; params without a gradient (lr_mult 0) get zeros."""
        out = []
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                g = self._zero_diffs.get(i)
                if g is None or g.shape != p.shape:
                    g = self._zero_diffs[i] = torch.zeros_like(p)
                else:
                    g.zero_()
                p.grad = g
            out.append(g)
        return out

    def _clip(self, diffs: list[torch.Tensor]) -> None:
        clip = _f32(self.param.clip_gradients)
        if clip < 0 or not diffs:
            return
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs))))
        if norm > clip:
            scale = _f32(clip / norm)
            glog.info(f"Gradient clipping: scaling down gradients (L2 norm {num(norm)} > "
                      f"{num(clip)}) by scale factor {num(scale)}", "sgd_solver.cpp:92")
            torch._foreach_mul_(diffs, scale)

    def _regularize(self, diffs: list[torch.Tensor], g: _Group) -> None:
        decay = _f32(_f32(self.param.weight_decay) * g.decay_mult)
        if not decay:
            return
        if self.param.regularization_type == "L2":
            torch._foreach_add_(diffs, g.weights, alpha=decay)
        else:   # L1 (validated at load)
            torch._foreach_add_(diffs, torch._foreach_sign(g.weights), alpha=decay)

    def _requested_action(self) -> str:
        return self.action_request() if self.action_request is not None else NONE

    # -- testing ---------------------------------------------------------------------
    def test_all(self) -> None:
        for i in range(len(self.test_modules)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, test_net_id: int = 0) -> list[float]:
        """Caffe's Test: ``test_iter`` forwards; each output element averaged over them."""
        glog.info(f"Iteration {self.iter}, Testing net (#{test_net_id})", "solver.cpp:346")
        module, net = self.test_modules[test_net_id], self.test_nets[test_net_id]
        module.share_trained_layers_with(self.train_module)
        n_iter = self.param.test_iter[test_net_id]
        sums, loss, outputs = None, None, None
        with torch.no_grad():
            for _ in range(n_iter):
                request = self._requested_action()
                while request != NONE:
                    if request == SNAPSHOT:
                        self.snapshot()
                    elif request == STOP:
                        self.requested_early_exit = True
                    request = self._requested_action()
                if self.requested_early_exit:
                    break
                iter_loss, outputs = module.forward_loss(**self._feed(net))
                flat = [outputs[n].detach().float().reshape(-1) for n in module.output_names]
                flat = torch.cat(flat) if flat else torch.zeros(0, device=self.device)
                sums = flat.clone() if sums is None else sums.add_(flat)
                if self.param.test_compute_loss:
                    loss = iter_loss if loss is None else loss + iter_loss
        if self.requested_early_exit:
            glog.info("Test interrupted.", "solver.cpp:394")
            return []
        if outputs is not None:
            self._store_outputs(net, outputs)
        if self.param.test_compute_loss and loss is not None:
            glog.info(f"Test loss: {num(_f32(float(loss) / n_iter))}", "solver.cpp:398")
        means = [] if sums is None else (sums / n_iter).tolist()
        names = [n for n in module.output_names for _ in range(outputs[n].numel())] \
            if outputs is not None else []
        self._log_scores("Test", list(zip(names, means)), module, "solver.cpp:413")
        self.mean_scores[test_net_id] = means
        return means

    @staticmethod
    def _store_outputs(net: Net, outputs: Mapping[str, torch.Tensor]) -> None:
        """Copy the output blobs into the pycaffe net's host blobs (loss, accuracy, ...)."""
        for name, t in outputs.items():
            if name in net.blobs:
                net.blobs[name]._store(t)

    # -- snapshots -------------------------------------------------------------------
    def snapshot_filename(self, extension: str) -> str:
        return snapshot_filename(self.param.snapshot_prefix, self.iter, extension)

    def snapshot(self) -> tuple[str, str]:
        """Write ``<prefix>_iter_<iter>.caffemodel`` and ``.solverstate`` (or ``.h5``).

        In a data-parallel group only the root writes; the others return the names.
        """
        fmt = self.param.snapshot_format
        model = self.snapshot_filename(model_extension(fmt))
        kind = "HDF5 file" if fmt == HDF5 else "binary proto file"
        state_path = self.snapshot_filename(state_extension(fmt))
        if not distributed.is_root():
            return model, state_path
        glog.info(f"Snapshotting to {kind} {model}", "solver.cpp:581")
        self._write(model, lambda: write_model(self.train_module, model, self.param.snapshot_diff))
        glog.info(f"Snapshotting solver state to {kind} {state_path}", "sgd_solver.cpp:273")
        state = SolverStateData(self.iter, model, [], self.current_step)
        self._write(state_path, lambda: write_state(state_path, state, self.history))
        return model, state_path

    def _write(self, path: str, writer: Callable[[], None]) -> None:
        try:
            writer()
        except OSError as exc:
            raise SnapshotError(f"cannot write snapshot '{path}': {exc.strerror or exc}. Make "
                                "sure that the directory of snapshot_prefix "
                                f"'{self.param.snapshot_prefix}' exists and is writeable") from None

    def restore(self, state_file: str) -> None:
        """Load a solverstate (Caffe's or ours; ``.h5`` → HDF5) and its learned_net."""
        state_file = os.fspath(state_file)
        state = read_state(state_file)
        if len(state.history) != len(self.history):
            raise SnapshotError(
                f"{state_file}: Incorrect length of history blobs: the file has "
                f"{len(state.history)}, a {self.param.type} solver for this net needs "
                f"{len(self.history)} ({self.rule.num_histories} per learnable param)")
        n = len(self._params)
        for k, (h, arr) in enumerate(zip(self.history, state.history)):
            if arr.size != h.numel():
                lp = self.train_module.learnable_params[k % n]
                raise SnapshotError(f"{state_file}: history blob {k} ({lp.name}) has shape "
                                    f"{arr.shape}, the net's param has {tuple(h.shape)}")
        steps = len(self.param.stepvalue)
        if self.param.lr_policy == "multistep" and state.current_step > steps:
            raise SnapshotError(f"{state_file}: current_step is {state.current_step} but the "
                                f"solver's multistep policy has {steps} stepvalues")
        if state.learned_net:
            weights.copy_from(self.train_module, resolve_learned_net(state.learned_net, state_file))
        with torch.no_grad():
            for h, arr in zip(self.history, state.history):
                h.copy_(torch.from_numpy(np.ascontiguousarray(arr)).reshape(h.shape))
        self.iter = int(state.iter)
        self.current_step = int(state.current_step)
        self._seek_data()
        glog.info("SGDSolver: restoring history", "sgd_solver.cpp:296")

    def _seek_data(self) -> None:
        """Point data layers at the batches an uninterrupted run would read next.

        Batch k's content (and its crop/mirror draws) is a function of k alone, so a run
        resumed at iteration N continues bit-for-bit: the train net has read N·iter_size
        batches, each test net test_iter batches per test round held before N. (Caffe
        restarts its readers at the first record instead.)
        """
        p = self.param
        self.train_module.seek_data(self.iter * p.iter_size)
        if p.test_interval > 0:
            rounds = (self.iter + p.test_interval - 1) // p.test_interval
            if not p.test_initialization and self.iter > 0:
                rounds -= 1
            for module, n in zip(self.test_modules, p.test_iter):
                module.seek_data(rounds * n)

    # -- non-finite loss ---------------------------------------------------------------
    def _fail_non_finite(self, loss: float, feed: Mapping[str, torch.Tensor]) -> None:
        """Snapshot the state before this update, find the first non-finite layer, stop."""
        msg = f"Iteration {self.iter}: the training loss is {num(loss)}"
        bad = [lp.name for lp in self.train_module.learnable_params
               if not bool(torch.isfinite(lp.tensor).all())]
        model, state = self.snapshot()
        where = self._first_non_finite_output(feed)
        msg += f"; {where}. Wrote a snapshot of the last state before this update: {model}, {state}"
        if bad:
            msg += f" (already non-finite in it: {', '.join(bad)})"
        msg += ". Lower base_lr, set clip_gradients, or check the input data."
        glog.error(msg, "solver.cpp:230")
        raise NonFiniteLossError(msg)

    def _first_non_finite_output(self, feed: Mapping[str, torch.Tensor]) -> str:
        m = self.train_module
        blobs: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, name in enumerate(m.layer_names):
                try:
                    m.run(feed, i, i, blobs=blobs)
                except Exception as exc:   # diagnostics must not hide the real error
                    return f"re-running the forward pass failed at layer '{name}': {exc}"
                for top in m.top_names[name]:
                    t = blobs.get(top)
                    if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return (f"the first non-finite output is top '{top}' of layer '{name}' "
                                f"({m.layers[i].type})")
        return ("a diagnostic forward pass found every layer output finite (the value "
                "depends on the batch, or arose in the backward pass)")
