"""Does the caffemodel a run leaves behind score what the run reported?

A run measures its test accuracy on the live net; a user gets the snapshot. The two once
disagreed (bf16 runs under autocast's weight cache: 94% reported, 11% from the caffemodel),
and nothing noticed. ``rescore`` builds the TEST net afresh from the run's net parameter,
loads the snapshot into it and scores it in float32 on the same batches, as ``caffe test``
would; ``verdict`` compares that with the run's own figure.
"""
from __future__ import annotations

import time

# Largest gap (accuracy, absolute) between the run's test and the reloaded snapshot that
# rounding explains: a bf16 run scored in float32 moves a few tenths of a point, and on a
# small test set a couple of images on the edge flip.
TOLERANCE = 0.01
EDGE_IMAGES = 2


def rescore(net_param, source: str, model: str, test_iter: int, acc_top: str,
            loss_top: str) -> dict:
    """Mean accuracy and loss of ``model`` over the first ``test_iter`` TEST batches of a
    freshly built net, scored as ``caffe test`` does in float32 on the CPU, and the seconds
    it took."""
    from caffe_compat.commands.device import DeviceChoice
    from caffe_compat.commands.test_cmd import score
    from caffe_compat.engine import weights
    from caffe_compat.engine.net.module import build_net
    from caffe_compat.proto import caffe_pb2

    start = time.perf_counter()
    net = build_net(net_param, caffe_pb2.TEST, source=source)
    try:
        weights.copy_from(net, model)
        result = score(net, test_iter, DeviceChoice("cpu", [], "fp32"))
    finally:
        net.close()
    means = dict(zip(result.names, result.means))
    return {"model": model, "accuracy": means[acc_top], "loss": means[loss_top],
            "seconds": time.perf_counter() - start}


def verdict(check: dict, run_accuracy: float, images: int) -> dict:
    """``check`` with the run's accuracy and whether the two agree: within TOLERANCE, or
    EDGE_IMAGES of ``images`` on a small test set."""
    gap = abs(check["accuracy"] - run_accuracy)
    allowed = max(TOLERANCE, EDGE_IMAGES / max(images, 1))
    return check | {"run_accuracy": run_accuracy, "agrees": gap <= allowed + 1e-9}


def markdown_row(check: dict) -> str:
    """One row for the report's Measured table."""
    state = ("agrees with the run's test" if check["agrees"] else
             f"**differs from the run's {check['run_accuracy'] * 100:.2f}%: the caffemodel "
             "does not hold the weights the run tested**")
    return (f"| the final caffemodel reloaded into a fresh TEST net (float32) | "
            f"{check['accuracy'] * 100:.2f}%, {state} |")


__all__ = ["TOLERANCE", "EDGE_IMAGES", "rescore", "verdict", "markdown_row"]
