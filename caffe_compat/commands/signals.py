"""Caffe's SignalHandler: SIGINT and SIGHUP become solver actions.

``caffe train --sigint_effect stop|snapshot|none --sighup_effect stop|snapshot|none``
(defaults ``stop`` and ``snapshot``). The handlers only set a flag; the solver polls
``action()`` (an action source, ``solver.add_action_source``) after each iteration and between test batches, then
snapshots and/or stops at that safe point. A stopped ``solve()`` still writes the final
snapshot (``snapshot_after_train``), so Ctrl-C leaves a resumable ``.solverstate``.

A second SIGINT while a stop is pending raises KeyboardInterrupt at once (for a stuck step).
"""
from __future__ import annotations

import signal
import threading

from caffe_compat.formats import glog
from caffe_compat.engine.solver.events import NONE, SNAPSHOT, STOP

EFFECTS = (STOP, SNAPSHOT, NONE)


class SignalHandler:
    """Install with ``with SignalHandler(...) as h: solver.add_action_source(h.action)``."""

    def __init__(self, sigint_effect: str = STOP, sighup_effect: str = SNAPSHOT):
        for flag, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if effect not in EFFECTS:
                raise ValueError(f"Invalid signal effect \"{effect}\" was specified for "
                                 f"--{flag} (known: {', '.join(EFFECTS)})")
        self.sigint_effect, self.sighup_effect = sigint_effect, sighup_effect
        self._got_sigint = self._got_sighup = False
        self._stop_pending = False
        self._previous: dict[int, object] = {}

    # -- handlers: set flags only ---------------------------------------------------------
    def _on_sigint(self, signum, frame) -> None:
        if self._stop_pending:
            raise KeyboardInterrupt
        self._got_sigint = True
        self._stop_pending = self._stop_pending or self.sigint_effect == STOP

    def _on_sighup(self, signum, frame) -> None:
        self._got_sighup = True
        self._stop_pending = self._stop_pending or self.sighup_effect == STOP

    def action(self) -> str:
        """Caffe's GetActionFunction: SIGINT's effect first, then SIGHUP's; flags reset."""
        if self._got_sigint:
            self._got_sigint = False
            if self.sigint_effect != NONE:
                glog.info(f"SIGINT received: {self.sigint_effect}", "signal_handler.cpp:40")
            return self.sigint_effect
        if self._got_sighup:
            self._got_sighup = False
            if self.sighup_effect != NONE:
                glog.info(f"SIGHUP received: {self.sighup_effect}", "signal_handler.cpp:44")
            return self.sighup_effect
        return NONE

    # -- installation ---------------------------------------------------------------------
    def install(self) -> "SignalHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        if hasattr(signal, "SIGHUP"):
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_sighup)
        return self

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> "SignalHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


__all__ = ["SignalHandler", "EFFECTS", "STOP", "SNAPSHOT", "NONE"]
