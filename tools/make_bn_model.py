#!/usr/bin/env python3
"""Write models/vgg16_landmark_32_bn/ from models/vgg16_landmark_64: the full-Fashion-MNIST variant.

Two changes, both for issue 14's "94.5% within 3 CPU-hours" and nothing else:
- BatchNorm + Scale after every trunk convolution (conv<b>_<n>, proj<b>), the way BVLC-era
  ResNets wrote it (BatchNorm in place with its three statistics blobs at lr_mult 0, then a
  Scale with bias_term; the convolution loses its now-redundant bias). Normalised blocks take
  a five times larger learning rate and converge in fewer epochs.
- A 32×32 input (a crop of the 36×36 LMDB records; Fashion-MNIST's images are 28×28) instead
  of 64×64: a quarter of the arithmetic per image. Every layer, width and the landmark
  branch stay; the heatmaps become 32×32 (LandmarkHeatmap height/width 32), the attention
  pooling still maps them to pool3's size (4×4), fc6 reads a 128×1×1 pool5.

Text edits on the source train_val keep its comments. deploy.prototxt, solver_full.prototxt,
readme.md and the drawing are written beside it.

A third change, only with --width K (issue 28's "wider variant, its own model folder"):
- every trunk convolution (and so pool3's attention Tile) K times as wide, written to
  models/vgg16_landmark_32_bn_wK/ with a solver_full.prototxt of its own (see WIDE_SOLVER).

  python tools/make_bn_model.py            # rewrites models/vgg16_landmark_32_bn
  python tools/make_bn_model.py --width 2  # rewrites models/vgg16_landmark_32_bn_w2
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE, TARGET = "vgg16_landmark_64", "vgg16_landmark_32_bn"
TRUNK_CONV = re.compile(r"(conv\d_\d|proj\d)")
# The TEST statistics average the last ~1/(1 - fraction) batches. Caffe's default 0.999 (about
# 1000 iterations) lags the weights at base_lr 0.05: at epoch 2 of the first run the test net
# scored 28% with those averages and 89.6% (500 images) with batch statistics. 0.99 (about 100
# batches of 64) follows them; TRAIN uses batch statistics, so no weight depends on it.
MOVING_AVERAGE_FRACTION = 0.99
LAYER_BLOCK = re.compile(r"^layer \{\n.*?^\}\n", re.S | re.M)


def target_name(width: int, crop: int = 32) -> str:
    """models/vgg16_landmark_<crop>_bn[_w<width>]: the 32×32, 1x net is TARGET."""
    base = TARGET if crop == 32 else f"vgg16_landmark_{crop}_bn"
    return base if width == 1 else f"{base}_w{width}"


def layer_name(block: str) -> str:
    return re.search(r'^  name: "([^"]+)"', block, re.M).group(1)


def normalisation_layers(top: str) -> str:
    """BatchNorm (statistics, never learned) and Scale (learned γ, β) in place on `top`."""
    suffix = top.replace("conv", "").replace("proj", "p")
    stats = "  param { lr_mult: 0 decay_mult: 0 }\n" * 3
    return (f'layer {{\n  name: "bn{suffix}"\n  type: "BatchNorm"\n  bottom: "{top}"\n'
            f'  top: "{top}"\n{stats}'
            f'  batch_norm_param {{ moving_average_fraction: {MOVING_AVERAGE_FRACTION} }}\n}}\n'
            f'layer {{\n  name: "scale{suffix}"\n  type: "Scale"\n  bottom: "{top}"\n'
            f'  top: "{top}"\n  scale_param {{ bias_term: true }}\n}}\n')


def normalised_conv(block: str) -> str:
    """The convolution without its bias (BatchNorm's mean subtraction would cancel it)."""
    block = block.replace("  param { lr_mult: 2 decay_mult: 0 }\n", "")
    block = re.sub(r"    bias_filler \{[^}]*\}\n", "", block)
    if "bias_term: false" not in block:
        block = block.replace("    num_output:", "    bias_term: false\n    num_output:", 1)
    top = re.search(r'^  top: "([^"]+)"', block, re.M).group(1)
    return block + normalisation_layers(top)


def widened(block: str, width: int) -> str:
    """A trunk convolution with ``width`` times its outputs."""
    return re.sub(r"num_output: (\d+)", lambda m: f"num_output: {int(m.group(1)) * width}",
                  block, count=1)


def bn_net(text: str, deploy: bool, width: int = 1, crop: int = 32) -> str:
    """The source net normalised, ``width`` times as wide, read at ``crop``×``crop``: the
    heatmap targets follow the crop, and the landmark branch's deconvolutions and the
    attention's 8×8 pooling keep matching pool2/pool3 for any crop divisible by 8."""
    def edit(match: re.Match) -> str:
        block = match.group(0)
        if "Convolution" in block and TRUNK_CONV.fullmatch(layer_name(block)):
            return normalised_conv(widened(block, width))
        if '"Tile"' in block:        # the attention map tiled over pool3's channels
            return re.sub(r"tiles: (\d+)", lambda m: f"tiles: {int(m.group(1)) * width}", block)
        return block
    body = LAYER_BLOCK.sub(edit, text)
    body = body.replace("crop_size: 64", f"crop_size: {crop}")
    body = re.sub(r"height: 64\n(\s*)width: 64", rf"height: {crop}\n\1width: {crop}", body)
    body = re.sub(r"input_param \{ shape \{ dim: (\d+) dim: (\d+) dim: 64 dim: 64",
                  rf"input_param {{ shape {{ dim: \1 dim: \2 dim: {crop} dim: {crop}", body)
    target = target_name(width, crop)
    body = re.sub(r'name: "VGG16_landmark_64"', f'name: "VGG16{target[5:]}"', body)
    kind = "deploy (Input layer, no losses)" if deploy else "train/test (Data layers, losses)"
    wide = f"; trunk convolutions {width}x as wide" if width > 1 else ""
    head = (f"# {target}, {kind}: generated by tools/make_bn_model.py from models/{SOURCE}.\n"
            f"# BatchNorm + Scale after every trunk convolution; {crop}x{crop} input (crop of "
            f"{crop + 4}x{crop + 4})"
            f"{wide}.\n")
    return head + re.sub(r"\A(#.*\n)+", "", body)


SOLVER_BODY = """net: "models/{target}/train_val.prototxt"
test_iter: 100
test_interval: 937
test_initialization: false
type: "SGD"
base_lr: 0.05
lr_policy: "poly"
power: 1
momentum: 0.9
weight_decay: 0.0005
clip_gradients: 10
max_iter: {iters}
display: 50
average_loss: 50
snapshot: {snapshot}
snapshot_prefix: "runs/{work}/{target}"
random_seed: 1
"""
SOLVER = f"""# {TARGET} on the full Fashion-MNIST: generated by tools/make_bn_model.py.
# Run with tools/full_fashion_mnist.py --size 36 --solver models/{TARGET}/solver_full.prototxt
# (it points the Data layers at data/fmnist_full_lmdb_36 in memory, train batch 64).
# One epoch = 60000 / 64 = 937.5 iterations; max_iter 18750 = 20 epochs; lr decays linearly
# to 0 at max_iter (poly, power 1). base_lr 0.05: five times the BN-free net's 0.01 (the
# normalised blocks tolerate it; see readme.md for the probes).
""" + SOLVER_BODY.format(target=TARGET, iters=18750, snapshot=937, work="fmnist_full_bn")


def readme_text(deploy: Path) -> str:
    """The folder's readme: what changed, counts (as test_models checks) and how to run it."""
    sys.path.insert(0, str(REPO))
    from caffe_compat.engine import analysis
    net = analysis.load_net(str(deploy))             # TEST phase, as test_models counts
    params, gflops = analysis.param_count(net), 2 * analysis.total_macs(net) / 1e9
    return f"""# {TARGET}: models/{SOURCE} with BatchNorm, at 32×32, for the full Fashion-MNIST

Generated by `python tools/make_bn_model.py` (edit that script, not these files).
The variant issue 14 allows for its "94.5% on the full Fashion-MNIST within 3 CPU-hours"
target: the same layers, names, widths, residual shortcuts, landmark branch and attention as
`models/{SOURCE}`, with two changes.

- **BatchNorm + Scale after every trunk convolution** (`conv<b>_<n>` and the projections
  `proj<b>`), in place, before the ReLU or the residual sum, as BVLC-era ResNets wrote it:
  `BatchNorm` with its three statistics blobs at lr_mult 0 (batch statistics in TRAIN, the
  moving averages in TEST, `moving_average_fraction` {MOVING_AVERAGE_FRACTION}: Caffe's 0.999
  averages ~1000 iterations, which lag the weights at base_lr 0.05 — the first run's test net
  scored 28% at epoch 2 with those averages and 89.6% with batch statistics), then `Scale` with `bias_term: true` (the learned γ and β); the
  convolutions lose their bias (the mean subtraction cancels it). The landmark branch and fc
  layers are unchanged. In TEST, inference fusion folds each BatchNorm + Scale into its
  convolution.
- **32×32 input**, a crop of 36×36 records (Fashion-MNIST's images are 28×28, so 64×64 only
  magnified them): a quarter of the arithmetic per image. Spatial sizes: pools 16, 8, 4, 2, 1;
  heatmaps 32×32 (`lm_target` 32×32, σ = 1 px); the attention's 8×8 average pooling maps them to
  pool3's 4×4; fc6 reads a 128×1×1 pool5.

- Parameters: {params:,}; {gflops:.3f} GFLOPs per 32×32 image (deploy).
- Drawing: ![{TARGET}]({TARGET}.png)
- Solver: `solver_full.prototxt` (SGD, base_lr 0.05, poly to 0 over 20 epochs of batch 64,
  momentum 0.9, weight_decay 0.0005, clip_gradients 10). There is no `solver.prototxt`: the
  paper's 40/10 protocol (tools/reproduce_paper.py) reads 72×72 LMDBs made for the 64×64 nets.
- Run: `python tools/full_fashion_mnist.py --size 36 --solver
  models/{TARGET}/solver_full.prototxt --report results/fmnist_full_bn.md --work
  runs/fmnist_full_bn` (builds `data/fmnist_full_lmdb_36` from the IDX files of
  `apt-get install dataset-fashion-mnist`); results: `results/fmnist_full_bn.md`.
"""


WIDE_EPOCHS = 30
WIDE_SOLVER = """# {target} on the full Fashion-MNIST: generated by tools/make_bn_model.py{flags}.
# Run with tools/full_fashion_mnist.py --size {size} --solver models/{target}/solver_full.prototxt
# --precision auto --layout auto (train batch 64). Issue 28's schedule: {epochs} epochs =
# {iters} iterations of 64, lr decaying linearly from 0.05 to 0 (poly, power 1), as
# solver_full of the 1x net; about {minutes} minutes of bf16 training on both cores of an AMX Xeon
# ({note}).
"""
# What each variant's runs scored, for its readme (a variant not run yet says so).
RESULTS = {
    "vgg16_landmark_32_bn_w2": """- Results on all 10,000 test images (bf16, NHWC, 2 cores of an AMX Xeon): 30 epochs
  **94.19%** in 83 min of training (`results/fmnist_full_bf16.md`); 45 epochs
  (`--max-iter 42188`) 94.03% in 148 min (`results/fmnist_full_bf16_45.md`); 30 epochs on
  40×40 records framing each image resized to 32×32 (`--size 40 --pad 4`: random crops shift
  the whole garment by up to 4 pixels) 93.78% in 87 min (`results/fmnist_full_bf16_pad4.md`).
  None reaches issue 28's 94.5%.
""",
    "vgg16_landmark_40_bn_w2": """- Results on all 10,000 test images (bf16, NHWC, 2 cores of an AMX Xeon): 24 epochs
  **94.27%** (the caffemodel reloaded in float32: 94.31%) in 82.7 min of training, 290
  images/s (`results/fmnist_full_bf16_c40.md`): the best of the four full runs, 0.08 points
  above the 32×32 net's 30 epochs in the same time, and short of issue 28's 94.5%.
""",
    "vgg16_landmark_48_bn_w2": """- Results on all 10,000 test images (bf16, NHWC, 2 cores of a Zen 4 AMD EPYC): 20 epochs
  (`--max-iter 18750`, set when the run resumed at iteration 5000 so that it would end
  inside a 3-hour session) **93.86%** (reloaded in float32: 93.87%; ten crops 94.15%) in
  116.6 min of training, 186 images/s (`results/fmnist_full_c48.md`): below the 40×40
  net's 24 epochs, and short of issue 28's 94.5%.
""",
}
SOLVER_NOTES = {"vgg16_landmark_32_bn_w2": "45 epochs scored no better: the model readme lists "
                "the runs"}


def variant_flags(width: int, crop: int, epochs: int) -> str:
    return (f" --width {width}" + (f" --crop {crop}" if crop != 32 else "")
            + (f" --epochs {epochs}" if epochs != WIDE_EPOCHS else ""))


def work_name(crop: int) -> str:
    """runs/ and results/ name of a variant's full Fashion-MNIST run."""
    return "fmnist_full_bf16" + (f"_c{crop}" if crop != 32 else "")


def wide_solver_text(width: int, crop: int, epochs: int) -> str:
    """solver_full.prototxt of a variant: ``epochs`` of 64-image batches, poly to 0."""
    name, iters = target_name(width, crop), round(epochs * 60000 / 64)
    # 85 minutes for 30 epochs of the 32×32 w2 net, scaled by pixels, width² and epochs
    minutes = round(85 * (crop / 32) ** 2 * (width / 2) ** 2 * epochs / 30)
    return WIDE_SOLVER.format(
        target=name, flags=variant_flags(width, crop, epochs), size=crop + 4, epochs=epochs,
        iters=iters, minutes=minutes,
        note=SOLVER_NOTES.get(name, "the model readme lists the runs")) + SOLVER_BODY.format(
        target=name, iters=iters, snapshot=500, work=work_name(crop))


def wide_readme_text(deploy: Path, width: int, crop: int = 32,
                     epochs: int = WIDE_EPOCHS) -> str:
    """The readme of a --width K [--crop C] folder: what differs from the 1x net, counts,
    how to run, what the runs scored."""
    sys.path.insert(0, str(REPO))
    from caffe_compat.engine import analysis
    net = analysis.load_net(str(deploy))
    params, gflops = analysis.param_count(net), 2 * analysis.total_macs(net) / 1e9
    target, size = target_name(width, crop), crop + 4
    work = work_name(crop)
    title = "" if crop == 32 else f", at {crop}×{crop}"
    larger = "" if crop == 32 else (
        f"\nThe input is {crop}×{crop} (crops of {size}×{size} records) instead of 32×32: "
        f"{(crop / 32) ** 2:.2f} times the\narithmetic per image; pool3's maps (and the "
        f"attention) are {-(-crop // 8)}×{-(-crop // 8)} instead of 4×4, and fc6 reads "
        f"pool5's\n{-(-crop // 32)}×{-(-crop // 32)} (Caffe's ceil-mode pooling) instead of "
        f"1×1. The heatmap targets are {crop}×{crop}.\n")
    run_line = (f"python tools/full_fashion_mnist.py --size {size} --solver\n  models/{target}/"
                f"solver_full.prototxt --precision auto --layout auto --threads 2\n  "
                f"--test-every 5 --work runs/{work} --report results/{work}.md")
    results = RESULTS.get(target, "- Results: not run yet.\n")
    return f"""# {target}: models/{TARGET} with {width}x wider trunk convolutions{title}

Generated by `python tools/make_bn_model.py{variant_flags(width, crop, epochs)}` (edit that
script, not these files). Issue 28 allows a wider variant of the paper's network family, in its
own folder, for "94.5% on the full Fashion-MNIST": `models/{TARGET}` (see its readme: BatchNorm +
Scale after every trunk convolution, 32×32 crops of 36×36 records) with every trunk convolution
(`conv<b>_<n>`, `proj<b>`) {width} times as wide, and pool3's attention `Tile` over {width} times
the channels. Layers, names, residual shortcuts, landmark branch, attention and fc layers are
otherwise unchanged.
{larger}
- Parameters: {params:,}; {gflops:.3f} GFLOPs per {crop}×{crop} image (deploy).
- Drawing: ![{target}]({target}.png)
- Solver: `solver_full.prototxt` (SGD, base_lr 0.05, poly to 0 over {epochs} epochs of
  batch 64, momentum 0.9, weight_decay 0.0005, clip_gradients 10, snapshots every 500
  iterations).
- Run ({epochs} epochs): `{run_line}`.
{results}"""


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1, help="trunk width multiplier (default 1)")
    ap.add_argument("--crop", type=int, default=32, choices=(32, 40, 48),
                    help="input side, a crop of records 4 pixels larger (default 32)")
    ap.add_argument("--epochs", type=int, default=WIDE_EPOCHS,
                    help=f"solver_full's schedule of a variant (default {WIDE_EPOCHS})")
    args = ap.parse_args(argv)
    width, crop = args.width, args.crop
    if width == 1 and (crop != 32 or args.epochs != WIDE_EPOCHS):
        ap.error("--crop and --epochs make a --width variant (K > 1)")
    name = target_name(width, crop)
    source, target = REPO / "models" / SOURCE, REPO / "models" / name
    target.mkdir(exist_ok=True)
    for file, deploy in (("train_val.prototxt", False), ("deploy.prototxt", True)):
        (target / file).write_text(bn_net((source / file).read_text(encoding="utf-8"), deploy,
                                          width, crop), encoding="utf-8")
    solver = SOLVER if width == 1 else wide_solver_text(width, crop, args.epochs)
    (target / "solver_full.prototxt").write_text(solver, encoding="utf-8")
    readme = readme_text(target / "deploy.prototxt") if width == 1 else \
        wide_readme_text(target / "deploy.prototxt", width, crop, args.epochs)
    (target / "readme.md").write_text(readme, encoding="utf-8")
    import subprocess
    subprocess.run([sys.executable, str(REPO / "tools" / "draw_net.py"), "--phase", "TEST",
                    "--title", name, str(target / "deploy.prototxt"),
                    str(target / f"{name}.png")], check=True)
    print(f"wrote models/{name}/ (train_val, deploy, solver_full, readme, drawing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
