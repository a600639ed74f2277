"""The one training loop (Caffe's ``Solver::Step``/``Solve``), on tensors only.

One iteration, as in solver.cpp:
  1. clear the param diffs;
  2. test when ``test_interval > 0 and iter % test_interval == 0 and (iter > 0 or
     test_initialization)``;
  3. ``iter_size`` × forward+backward, diffs accumulating; loss = mean over the passes;
  4. smooth the loss (``average_loss``), display;
  5. ApplyUpdate (``update.py``): clip, normalise, regularise, rule, ``w ← w − update``;
     ``iter += 1``;
  6. snapshot when ``snapshot > 0 and iter % snapshot == 0``.

Observers (commands, progress bar, metrics, plots, experiments) subscribe to the events of
``events.py``; nothing else runs this loop. Input blobs come from ``feed(net_index)``: the
engine keeps one zero-filled tensor per Input blob, and the pycaffe ``Solver`` (one layer up)
feeds them from its ``net.blobs`` instead.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Mapping

import torch
from google.protobuf import text_format

from caffe_compat.engine import distributed, mode, rng, weights
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.engine.solver import resume, testing
from caffe_compat.engine.solver.diagnostics import NonFiniteLossError, fail_non_finite
from caffe_compat.engine.solver.events import (NONE, SNAPSHOT, STOP, EventBus, IterationDone,
                                               RunFinished, RunStarted, SnapshotWritten)
from caffe_compat.engine.solver.lr_policy import learning_rate
from caffe_compat.engine.solver.params import (SolverParamError, read_solver_param,
                                               test_net_specs, train_net_spec,
                                               upgrade_solver_param, validate)
from caffe_compat.engine.solver.snapshot import (HDF5, SnapshotError, SolverStateData,
                                                 model_extension, snapshot_filename,
                                                 state_extension, write_model, write_state)
from caffe_compat.engine.solver.update import ParamUpdater, f32
from caffe_compat.formats import glog
from caffe_compat.formats.glog import num
from caffe_compat.proto import caffe_pb2

__all__ = ["Solver", "NonFiniteLossError", "NONE", "STOP", "SNAPSHOT"]


class Solver:
    """A Caffe solver over NetModules: ``train_module``, ``test_modules``, ``events``.

    Build from a solver prototxt path or a SolverParameter. Subclasses set ``solver_type``
    to force the update rule, as pycaffe's typed constructors do; otherwise the file's
    ``type`` decides.
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
        self.events = EventBus()
        self.keep_all_blobs = False   # True: blobs_ready() gets every blob, not the outputs
        # True: each test reads its net's data from the first batch (Caffe's test nets go on
        # reading where the last test stopped; with test_iter below one epoch that means each
        # test sees other images)
        self.test_from_first_batch = False
        self._callbacks: list[tuple[Callable | None, Callable | None]] = []
        self._check_snapshot_writable()
        if self.param.random_seed >= 0:
            rng.set_seed(self.param.random_seed)
        self.device = mode.device()
        self.train_module = self._init_train_net()
        self.test_modules = self._init_test_nets()
        self._load_weights_field()
        self.modules = [self.train_module, *self.test_modules]
        # Zero Input blobs, made on first use: pycaffe's solver feeds its own arrays instead.
        self.input_tensors: list[dict[str, torch.Tensor] | None] = [None] * len(self.modules)
        self.mean_scores: list[list[float]] = [[] for _ in self.test_modules]
        self.updater = ParamUpdater(self.param, self.train_module)
        self.images_per_iter = _images_per_iteration(self.train_module, self.param.iter_size)
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
        if not modules and self.param.test_interval > 0:
            # Caffe accepts this and never tests (a net/net_param solver gets one test net
            # per test_iter entry); say so rather than train silently without tests
            glog.warning(f"{self.source or '<solver>'}: test_interval is "
                         f"{self.param.test_interval} but no test_iter is given, so no test "
                         "net is built and this run never tests; add test_iter: N (the "
                         "batches of one test) to test", "solver.cpp:72")
        return modules

    def _load_weights_field(self) -> None:
        """The solver's ``weights`` entries (comma lists allowed) go into every net by name."""
        for entry in self.param.weights:
            for path in filter(None, (p.strip() for p in entry.split(","))):
                for module in [self.train_module, *self.test_modules]:
                    weights.copy_from(module, path)

    def _zero_inputs(self, module: NetModule) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(module.blob_shapes[name], device=self.device)
                for name in module.input_names}

    # -- what observers and subclasses use -------------------------------------------
    @property
    def history(self) -> list[torch.Tensor]:
        return self.updater.history

    @property
    def rule(self):
        """The update rule of the solver's type (``updates.py``)."""
        return self.updater.rule

    @property
    def learnable_tensors(self) -> list[torch.Tensor]:
        return self.updater.params

    def param_diffs(self) -> list[torch.Tensor]:
        """Each learnable param's diff tensor (zeros where no gradient arrived)."""
        return self.updater.diffs()

    def subscribe(self, fn, *kinds):
        """Call ``fn(event)`` for every event (or only those of the given classes)."""
        return self.events.subscribe(fn, *kinds)

    def add_action_source(self, fn: Callable[[], str]) -> None:
        """``fn()`` is asked after every iteration: NONE, SNAPSHOT or STOP."""
        self.events.add_action_source(fn)

    def add_callback(self, on_start: Callable[[], None] | None = None,
                     on_gradients_ready: Callable[[], None] | None = None) -> None:
        """pycaffe's ``solver.add_callback(on_start, on_gradients_ready)``."""
        self._callbacks.append((on_start, on_gradients_ready))

    def feed(self, net_index: int) -> dict[str, torch.Tensor]:
        """The Input blobs of net ``net_index`` (0 = train, 1.. = test nets)."""
        if self.input_tensors[net_index] is None:
            self.input_tensors[net_index] = self._zero_inputs(self.modules[net_index])
        return self.input_tensors[net_index]

    def blobs_ready(self, net_index: int, blobs: Mapping[str, torch.Tensor]) -> None:
        """Called with the last forward's output blobs at the end of step() and test()."""

    # -- the loop --------------------------------------------------------------------
    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's Step), testing and snapshotting on schedule."""
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        self._losses = []
        self.smoothed_loss = 0.0
        self._timer, self._iterations_last = time.perf_counter(), self.iter
        self.events.emit(RunStarted(self.iter, stop_iter, self.images_per_iter))
        outputs = None
        while self.iter < stop_iter:
            self.updater.clear_diffs()
            if self._test_due():
                self.test_all()
                if self.requested_early_exit:
                    break
            started = time.perf_counter()
            outputs = self._iterate(start_iter, last=self.iter + 1 == stop_iter)
            self._emit_iteration(outputs, time.perf_counter() - started)
            request = self.events.requested_action()
            if (self.param.snapshot > 0 and self.iter % self.param.snapshot == 0) or \
                    request == SNAPSHOT:
                self.snapshot()
            if request == STOP:
                self.requested_early_exit = True
                break
        if outputs is not None:
            self.blobs_ready(0, outputs)

    def _iterate(self, start_iter: int, last: bool = True) -> dict[str, torch.Tensor]:
        """Steps 3-5 of one iteration; returns the train net's output blobs (every blob with
        ``keep_all_blobs``, on the ``last`` iteration of a step only: blobs_ready() reads
        that one, and the others run the lean plan)."""
        for on_start, _ in self._callbacks:
            if on_start:
                on_start()
        display = self.param.display > 0 and self.iter % self.param.display == 0
        feed = self.feed(0)
        loss, outputs = self._forward_backward(feed, self.keep_all_blobs and last)
        self.loss = loss
        if not math.isfinite(loss):
            fail_non_finite(self, loss, feed)
        self._update_smoothed_loss(loss, start_iter, self.param.average_loss)
        if display:
            self._display(outputs)
        for _, on_ready in self._callbacks:
            if on_ready:
                on_ready()
        self.apply_update(display)
        self.iter += 1
        return outputs

    def _emit_iteration(self, outputs: Mapping[str, torch.Tensor], seconds: float) -> None:
        if not self.events.wants(IterationDone):
            return
        values = {name: outputs[name].detach().float().reshape(-1).tolist()
                  for name in self.train_module.output_names if name in outputs}
        self.events.emit(IterationDone(self.iter, self.loss, self.smoothed_loss,
                                       self.learning_rate, values,
                                       dict(self.train_module.loss_weights), seconds,
                                       self.images_per_iter))

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
            self.events.emit(RunFinished(self.iter, True))
            return
        if p.display > 0 and self.iter % p.display == 0:
            with torch.no_grad():
                loss, outputs = self.train_module.forward_loss(**self.feed(0))
            self._update_smoothed_loss(float(loss), start_iter, p.average_loss)
            self.blobs_ready(0, outputs)
            glog.info(f"Iteration {self.iter}, loss = {num(self.smoothed_loss)}", "solver.cpp:320")
        if p.test_interval > 0 and self.iter % p.test_interval == 0 and distributed.is_root():
            self.test_all()
        glog.info("Optimization Done.", "solver.cpp:325")
        self.events.emit(RunFinished(self.iter, self.requested_early_exit))

    def _test_due(self) -> bool:
        p = self.param
        return p.test_interval > 0 and self.iter % p.test_interval == 0 and \
            (self.iter > 0 or p.test_initialization) and bool(self.test_modules) and \
            distributed.is_root()

    def _forward_backward(self, feed: Mapping[str, torch.Tensor], keep_all: bool = False
                          ) -> tuple[float, dict[str, torch.Tensor]]:
        total, outputs = None, {}
        for i in range(self.param.iter_size):
            last = i == self.param.iter_size - 1
            loss, outputs = self.train_module.forward_loss(keep_all and last, **feed)
            if loss.requires_grad:
                loss.backward()
            loss = loss.detach()
            total = loss if total is None else total + loss
        return f32(float(total) / self.param.iter_size), outputs

    def _update_smoothed_loss(self, loss: float, start_iter: int, average_loss: int) -> None:
        """Caffe's UpdateSmoothedLoss: running mean until full, then a ring buffer."""
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = f32((self.smoothed_loss * (size - 1) + loss) / size)
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss = f32(self.smoothed_loss
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
        testing.log_scores("Train", scores, self.train_module, "solver.cpp:259")

    def policy_rate(self) -> float:
        """SGDSolver::GetLearningRate at ``iter``; a multistep boundary moves current_step."""
        rate, self.current_step = learning_rate(
            self.param, self.iter, self.current_step,
            log=lambda msg: glog.info(msg, "sgd_solver.cpp:53"))
        return rate

    def apply_update(self, display: bool = False) -> None:
        """SGDSolver::ApplyUpdate on the current diffs: clip, normalise, regularise, update."""
        rate = self.policy_rate()
        self.learning_rate = rate
        if display:
            glog.info(f"Iteration {self.iter}, lr = {num(rate)}", "sgd_solver.cpp:106")
        self.updater.apply(rate, self.iter)

    # -- testing ---------------------------------------------------------------------
    def test_all(self) -> None:
        for i in range(len(self.test_modules)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, test_net_id: int = 0) -> list[float]:
        """Caffe's Test: ``test_iter`` forwards; each output element averaged over them."""
        return testing.run_test(self, test_net_id)

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
        self.events.emit(SnapshotWritten(self.iter, model, state_path))
        return model, state_path

    def _write(self, path: str, writer: Callable[[], None]) -> None:
        try:
            writer()
        except OSError as exc:
            raise SnapshotError(f"cannot write snapshot '{path}': {exc.strerror or exc}. Make "
                                "sure that the directory of snapshot_prefix "
                                f"'{self.param.snapshot_prefix}' exists and is writeable") from None

    def restore(self, state_file: str) -> None:
        """Load a solverstate (Caffe's or ours; ``.h5`` → HDF5) and its learned_net; data
        layers then continue where an uninterrupted run would read (``resume.py``)."""
        resume.restore(self, os.fspath(state_file))

    def close(self) -> None:
        """Stop prefetch threads and release the databases (a LevelDB admits one opener)."""
        for module in self.modules:
            module.close()


def _images_per_iteration(module: NetModule, iter_size: int) -> int:
    """Batch size of the train net's first source blob (Data/Input/...) × iter_size."""
    for name in module.layer_names:
        if not module.bottom_names[name] and module.top_names[name]:
            shape = module.blob_shapes.get(module.top_names[name][0]) or (1,)
            return int(shape[0] if shape else 1) * iter_size
    return iter_size
