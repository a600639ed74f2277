"""results/bench/<date>.md and .json from the suite's results."""
from __future__ import annotations

import json
import math
from pathlib import Path

from caffe_compat.formats.atomic import write_text

from .peers import peer_table

# BVLC Caffe 1.0 `caffe time` figures from issue 13 (2-core Intel Xeon, OpenBLAS SkylakeX
# kernels, 2 threads). No Caffe binary is available to the suite: these are references only.
CAFFE_REFERENCE = {
    ("vgg16", 8, 224): {"ms": 6092.0, "peak_memory_gb": 2.45},
    ("vgg16", 32, 32): {"ms": 844.0, "range": "829-859 ms"},
}
INFERENCE_ORDER = ["module", "fused", "fused_cl", "fused_cl_direct", "fused_forms", "frozen",
                   "pycaffe", "pycaffe_auto", "pycaffe_onnxruntime", "pycaffe_openvino",
                   "torchscript", "onnxruntime", "openvino", "opencv"]
OURS = ("module", "fused", "fused_cl", "fused_forms", "frozen")


def _ms(v) -> str:
    return "" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _best_ours(cands: dict) -> tuple[str, float] | None:
    mine = [(k, cands[k]["ms"]) for k in OURS if k in cands]
    return min(mine, key=lambda kv: kv[1]) if mine else None


def inference_table(results: list[dict]) -> list[str]:
    present = [k for k in INFERENCE_ORDER if any(k in r["candidates"] for r in results)]
    lines = ["| net (batch) | " + " | ".join(present) +
             " | best ours vs OpenCV | pycaffe / module | pycaffe / best ours |",
             "|---" * (len(present) + 4) + "|"]
    ratios = []
    for r in results:
        c = r["candidates"]
        cells = [_ms(c[k]["ms"]) if k in c else "" for k in present]
        best, vs = _best_ours(c), ""
        if best and "opencv" in c:
            ratio = c["opencv"]["ms"] / best[1]
            ratios.append(ratio)
            vs = f"{ratio:.2f}x ({best[0]})"
        overhead = (f"{c['pycaffe']['ms'] / c['module']['ms']:.2f}" if "pycaffe" in c else "")
        vs_best = (f"{c['pycaffe']['ms'] / best[1]:.2f}" if "pycaffe" in c and best else "")
        lines.append(f"| {r['net']} ({r['batch']}) | " + " | ".join(cells) +
                     f" | {vs} | {overhead} | {vs_best} |")
    if ratios:
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        lines.append(f"\nGeometric mean, best caffe-compat path vs OpenCV DNN: **{geo:.2f}x**.")
    diffs = {k: max(r["candidates"][k]["max_abs_diff"] for r in results if k in r["candidates"])
             for k in present}
    lines.append("Largest |output - module output| per path: " +
                 ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ".")
    notes = [f"{r['net']} {k}: {v}" for r in results for k, v in r.get("notes", {}).items()]
    if notes:
        lines.append("Notes: " + "; ".join(notes) + ".")
    return lines


def training_table(results: list[dict]) -> list[str]:
    lines = ["| net, batch@size | config (impl/layout/precision) | ms / step | GFLOP/s | "
             "% of fp32 peak | peak RSS | reference |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ref = CAFFE_REFERENCE.get((r["net"], r["batch"], r["size"]))
        best = min(v["ms"] for v in r["configs"].values())
        for key, v in r["configs"].items():
            mem = v.get("peak_rss_bytes")
            cell_ref = ""
            if ref and key == "prototxt/nchw/fp32":
                cell_ref = f"Caffe {ref.get('range', _ms(ref['ms']) + ' ms')} (issue 13); " \
                           f"Caffe ms / this ms = {ref['ms'] / v['ms']:.2f}"
            frac = v.get("fraction_of_peak")
            mark = " **best**" if v["ms"] == best else ""
            lines.append(f"| {r['net']}, {r['batch']}@{r['size']} | {key}{mark} | {_ms(v['ms'])} "
                         f"| {v['gflops']:.1f} | {100 * frac:.1f}% | "
                         f"{'' if mem is None else f'{mem / 1e9:.2f} GB'} | {cell_ref} |"
                         if v.get("gflops") else
                         f"| {r['net']}, {r['batch']}@{r['size']} | {key}{mark} | {_ms(v['ms'])} "
                         f"| | | | {cell_ref} |")
    return lines


def write(results: dict, folder: Path, stem: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    m = results["machine"]
    md = [f"# Benchmarks {stem}", "",
          f"Machine: {m['cpu']} ({m['vendor']} family {m['family']} model {m['model']}), "
          f"{m['cpus']} CPUs, flags {', '.join(m['flags']) or 'none of interest'}; torch "
          f"{m['torch']}, {m['threads']} threads, Python {m['python']}. Load average "
          f"{m['load_average_start']} at the start, {m.get('load_average_end')} at the end "
          "(the CPU is shared with other work: every table alternates its candidates "
          "within one process, so load affects them alike). "
          f"{m.get('allocator', 'Allocator system')}.", "",
          f"fp32 peak estimate: {m['peak_how']} = "
          f"{m['peak_fp32_gflops'] and round(m['peak_fp32_gflops'], 1)} GFLOP/s "
          f"(clock from {m['clock_source']}).", "",
          f"Command: `{results['command']}`", ""]
    if results.get("inference"):
        md += ["## Inference against the peers, fp32 (ms per forward)", ""]
        md += peer_table(results["inference"]) + [""]
        md += ["## Inference, every path, fp32 (ms per forward; lower is better)", ""]
        md += inference_table(results["inference"]) + [""]
    if results.get("training"):
        md += ["## Training step (forward + backward), ms", ""]
        md += training_table(results["training"]) + [""]
        md.append("Caffe references are issue 13's `caffe time` figures on a 2-core Intel Xeon, "
                  "not measured here.")
    for note in results.get("notes", []):
        md += [f"Note: {note}", ""]
    if results.get("errors"):
        md += ["## Errors", ""] + [f"- {e}" for e in results["errors"]] + [""]
    md_path, json_path = folder / f"{stem}.md", folder / f"{stem}.json"
    write_text(md_path, "\n".join(md) + "\n")
    write_text(json_path, json.dumps(results, indent=1, default=str) + "\n")
    return md_path, json_path
