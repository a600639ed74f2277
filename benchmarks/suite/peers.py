"""The peer table: caffe-compat against the fastest of OpenCV DNN, onnxruntime and OpenVINO."""
from __future__ import annotations

import math

PEERS = ("opencv", "onnxruntime", "openvino")
OURS = ("module", "fused", "fused_cl", "fused_forms", "frozen", "pycaffe")


def _ms(v) -> str:
    return "" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _correct(row: dict, tolerance: float = 1e-3) -> bool:
    return row.get("max_abs_diff", 0.0) <= tolerance


def _engine_candidate(c: dict) -> str | None:
    return next((k for k in c if k.startswith("pycaffe_")), None)


def peer_table(results: list[dict]) -> list[str]:
    """Per net and batch: ours (pycaffe with the chosen engine, and the best torch path),
    each peer, and fastest peer ms / ours ms (above 1: ours is faster)."""
    lines = ["| net (batch) | pycaffe (engine) | best torch path | OpenCV DNN | onnxruntime | "
             "OpenVINO | fastest peer | peer / pycaffe | pycaffe / its engine |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for r in results:
        c = r["candidates"]
        eng = _engine_candidate(c)
        chosen = r.get("notes", {}).get(eng, "").replace("engine ", "") if eng else ""
        ours = c[eng]["ms"] if eng else c.get("pycaffe", {}).get("ms")
        # a path whose outputs are wrong does not count (TorchScript freezes a
        # DetectionOutput's host-side result as a constant)
        torch_best = min((c[k]["ms"], k) for k in OURS if k in c and _correct(c[k]))
        peers = [(c[p]["ms"], p) for p in PEERS if p in c and _correct(c[p])]
        cells = [_ms(c[p]["ms"]) if p in c else "—" for p in PEERS]
        fastest = min(peers) if peers else None
        ratio = ""
        if fastest and ours:
            ratios.append(fastest[0] / ours)
            ratio = f"{fastest[0] / ours:.2f}x"
        own = c.get(chosen, {}).get("ms") if chosen in PEERS else \
            (torch_best[0] if chosen == "torch" else None)
        vs_own = f"{ours / own:.2f}" if own and ours else ""
        lines.append(f"| {r['net']} ({r['batch']}) | {_ms(ours)} ({chosen or 'torch'}) | "
                     f"{_ms(torch_best[0])} ({torch_best[1]}) | " + " | ".join(cells) +
                     f" | {fastest[1] if fastest else ''} | {ratio} | {vs_own} |")
    if ratios:
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        wins = sum(x >= 1 for x in ratios)
        lines.append(f"\nGeometric mean of fastest peer / pycaffe: **{geo:.2f}x**; pycaffe at "
                     f"least as fast as every peer on {wins} of {len(ratios)} rows.")
    return lines


__all__ = ["peer_table", "PEERS"]
