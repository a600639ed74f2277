"""Data-parallel training over torch.distributed, with Caffe's multi-GPU semantics.

Each process (one per device) runs the full solver on its own ``batch_size`` batch; after
the backward passes the gradients are averaged across processes (Caffe's NCCL callback
sums and scales by 1/solver_count), and every process applies the same update, so the
weights stay identical. Process 0 is the root: only it tests, logs and snapshots. TRAIN
Data layers give rank r the records r, r+W, r+2W, ... (Caffe's DataLayer::Skip).

The backend is NCCL on GPUs and gloo on the CPU; multi-machine runs go through
``torchrun`` (see README), which sets the rendezvous environment this module reads.
"""
from __future__ import annotations

import os
import socket
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# pycaffe's set_solver_count / set_solver_rank: a script (BVLC's python/train.py) declares its
# place before it builds the solver, and the group is joined later (caffe.NCCL). The TRAIN
# data layers' record striding and the root-only testing/snapshots follow the declaration.
_declared: dict[str, int | None] = {"count": None, "rank": None}


def declare(count: int | None = None, rank_: int | None = None) -> None:
    if count is not None:
        _declared["count"] = int(count)
    if rank_ is not None:
        _declared["rank"] = int(rank_)


def solver_count() -> int:
    count = _declared["count"]
    return world_size() if count is None else count


def solver_rank() -> int:
    value = _declared["rank"]
    return rank() if value is None else value


def is_root() -> bool:
    return solver_rank() == 0


T = TypeVar("T")


def decided_by_root(decide: Callable[[], T]) -> T:
    """``decide()`` run by the root alone, its result handed to every process of the group.

    Choices made by timing a probe (``--precision auto``, ``--layout auto``) could differ
    from process to process on a busy machine; the group must run one configuration."""
    if world_size() == 1:
        return decide()
    box = [decide() if is_root() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def attach(solver) -> None:
    """Make ``solver`` one member of a data-parallel group: same start weights, averaged diffs."""
    if world_size() == 1:
        return
    broadcast_weights(solver)
    solver.add_callback(on_gradients_ready=lambda: average_gradients(solver))


def broadcast_weights(solver) -> None:
    """Every process takes the root's learnable weights (Caffe's NCCL::Broadcast)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in solver.learnable_tensors:
            dist.broadcast(p.data, src=0)


def average_gradients(solver) -> None:
    """Sum the parameter diffs over the group and scale by 1/count (Caffe's NCCL callback)."""
    if world_size() == 1:
        return
    diffs = solver.param_diffs()                # zero-filled where a param got no gradient
    flat = torch.cat([d.reshape(-1) for d in diffs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size())
    offset = 0
    for d in diffs:
        n = d.numel()
        d.copy_(flat[offset:offset + n].view_as(d))
        offset += n


def new_group_id() -> bytes:
    """A rendezvous for processes of this machine (pycaffe's ``NCCL.new_uid()``): a free
    local TCP port, bound by process 0 when the group forms (nothing is left on disk)."""
    return f"tcp://127.0.0.1:{_free_port()}".encode()


def join_group(group_id: bytes | str, rank_: int, count: int, on_gpu: bool) -> None:
    """Join the group ``group_id`` (from new_group_id) as process ``rank_`` of ``count``."""
    if dist.is_initialized():
        return
    url = group_id.decode() if isinstance(group_id, bytes) else str(group_id)
    torch.set_num_threads(threads_per_process(count))
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=url, rank=rank_,
                            world_size=count)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn: Callable[[int], None], devices: Sequence[int | None],
            backend: str, port: int, threads: int) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.set_num_threads(threads)
    device = devices[local_rank]
    if device is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=local_rank, world_size=len(devices))
    try:
        fn(local_rank)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[[int], None], devices: Sequence[int | None]) -> None:
    """Run ``fn(rank)`` in one process per entry of ``devices`` (CUDA ids, or None for CPU).

    ``fn`` must be picklable (a module-level function or functools.partial of one).
    """
    backend = "nccl" if all(d is not None for d in devices) else "gloo"
    mp.spawn(_worker, args=(fn, list(devices), backend, _free_port(),
                            threads_per_process(len(devices))),
             nprocs=len(devices), join=True)


def threads_per_process(processes: int) -> int:
    """This process's intra-op threads shared out among ``processes`` on the same machine.

    Each spawned process would otherwise start as many OpenMP threads as there are cores, and
    N busy-waiting thread pools on the same cores ran a 2-process CPU run 20x slower per
    iteration than one process (vgg16_landmark_64, 2 cores)."""
    return max(1, torch.get_num_threads() // processes)


def init_from_env() -> bool:
    """Join a group started by torchrun (RANK/WORLD_SIZE set); returns True when joined."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True
