"""What the solver loop tells its observers, and how observers ask it to stop or snapshot.

The solver engine owns the one training loop (iterate, test, display, snapshot, stop). Every
other piece — the ``caffe train`` command, the progress bar, the metrics file, the plot,
TensorBoard, the paper reproduction, data-parallel training — subscribes to these events
instead of copying the loop or patching solver methods:

    solver.subscribe(lambda event: print(event))           # every event
    solver.subscribe(on_test, TestDone)                    # one kind
    solver.add_action_source(lambda: STOP if late() else NONE)

Events are plain dataclasses; values are Python floats (already on the host), so observers
never touch tensors or synchronise a GPU themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# Caffe's SolverAction: what an action source (signal handler, time budget) may ask for.
NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"


@dataclass(frozen=True)
class RunStarted:
    """``solve()`` or ``step()`` begins at ``iter`` and will stop at ``stop_iter``."""
    iter: int
    stop_iter: int
    images_per_iter: int


@dataclass(frozen=True)
class IterationDone:
    """One update applied; ``iter`` is the count after it (Caffe's ``iter_`` + 1).

    ``outputs`` holds the train net's output blobs (each flattened to a list), ``loss`` the
    iteration's weighted loss (mean over iter_size passes), ``smoothed_loss`` Caffe's
    ``average_loss`` running mean, ``seconds`` the wall time of this iteration.
    """
    iter: int
    loss: float
    smoothed_loss: float
    lr: float
    outputs: dict[str, list[float]]
    loss_weights: dict[str, float]
    seconds: float
    images: int


@dataclass(frozen=True)
class TestDone:
    """Test net ``net_id`` ran ``test_iter`` batches at ``iter``; ``scores`` are the means."""
    iter: int
    net_id: int
    scores: dict[str, list[float]]
    loss_weights: dict[str, float]
    loss: float | None = None
    seconds: float = 0.0

    def scalar(self, name: str) -> float | None:
        values = self.scores.get(name)
        return values[0] if values and len(values) == 1 else None


@dataclass(frozen=True)
class SnapshotWritten:
    iter: int
    model: str
    state: str


@dataclass(frozen=True)
class RunFinished:
    iter: int
    stopped_early: bool


Event = RunStarted | IterationDone | TestDone | SnapshotWritten | RunFinished
Subscriber = Callable[[Event], None]


@dataclass
class EventBus:
    """Subscribers (optionally filtered by event type) and action sources of one solver."""
    _subscribers: list[tuple[Subscriber, tuple[type, ...]]] = field(default_factory=list)
    _action_sources: list[Callable[[], str]] = field(default_factory=list)

    def subscribe(self, fn: Subscriber, *kinds: type) -> Subscriber:
        self._subscribers.append((fn, kinds))
        return fn

    def unsubscribe(self, fn: Subscriber) -> None:
        self._subscribers = [(f, k) for f, k in self._subscribers if f != fn]

    def emit(self, event: Event) -> None:
        for fn, kinds in list(self._subscribers):
            if not kinds or isinstance(event, kinds):
                fn(event)

    def wants(self, kind: type) -> bool:
        """Whether anyone listens to ``kind`` (lets the loop skip building costly events)."""
        return any(not kinds or kind in kinds for _, kinds in self._subscribers)

    def add_action_source(self, fn: Callable[[], str]) -> None:
        self._action_sources.append(fn)

    def remove_action_source(self, fn: Callable[[], str]) -> None:
        self._action_sources = [f for f in self._action_sources if f != fn]

    def requested_action(self) -> str:
        """STOP wins over SNAPSHOT; every source is asked (each may consume its request)."""
        actions = [fn() for fn in list(self._action_sources)]
        if STOP in actions:
            return STOP
        return SNAPSHOT if SNAPSHOT in actions else NONE
