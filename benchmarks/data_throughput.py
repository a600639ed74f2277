"""Images per second the Data layer delivers: 224×224 TRAIN batches with mirror, crop and mean.

Builds a temporary colour LMDB of the embedded data/fashion50 images resized to --size
(default 256, as for VGG16/AlexNet) and its mean file, then times forward() of a TRAIN-phase
Data layer (crop_size --crop, mirror, mean_file) with a consumer that does no work, i.e.
the pipeline's ceiling. Also reports the time forward() spent waiting on the prefetch
workers. Compare the printed images/s with what a training step consumes
(benchmarks/vgg16_train_step.py: batch / step time).

    python benchmarks/data_throughput.py [--batch 32] [--batches 30] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.protobuf import text_format  # noqa: E402

from caffe_compat.formats.blob_io import write_blobproto  # noqa: E402
from caffe_compat.data.convert import compute_mean, convert_imageset  # noqa: E402
from caffe_compat.engine.layers import TRAIN, layer_class  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build(tmp: Path, size: int, records: int) -> tuple[str, str]:
    images = REPO / "data" / "fashion50"
    lines = [line for line in (images / "train.txt").read_text().splitlines() if line][:records]
    (tmp / "list.txt").write_text("\n".join(lines) + "\n")
    db = tmp / "db"
    convert_imageset(f"{images}/", os.fspath(tmp / "list.txt"), os.fspath(db),
                     resize_height=size, resize_width=size, show_progress=False)
    mean = tmp / "mean.binaryproto"
    write_blobproto(mean, compute_mean(os.fspath(db)))
    return os.fspath(db), os.fspath(mean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=100, help="timed batches (after 2 warm-up)")
    ap.add_argument("--size", type=int, default=256, help="stored image side")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--no-vgg", dest="vgg", action="store_false",
                    help="skip timing the VGG16 step the ratio is taken against")
    ap.add_argument("--workers", type=int, default=None,
                    help="prefetch threads (default: CAFFE_COMPAT_DATA_WORKERS or cores/2)")
    args = ap.parse_args()
    if args.workers:
        os.environ["CAFFE_COMPAT_DATA_WORKERS"] = str(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        db, mean = build(Path(tmp), args.size, args.records)
        param = text_format.Parse(
            f'name: "data" type: "Data" top: "data" top: "label" '
            f'transform_param {{ mirror: true crop_size: {args.crop} mean_file: "{mean}" }} '
            f'data_param {{ source: "{db}" backend: LMDB batch_size: {args.batch} }}',
            caffe_pb2.LayerParameter())
        layer = layer_class("Data")(param, [], TRAIN)
        for _ in range(2):
            layer()
        waited = layer.wait_seconds
        start = time.perf_counter()
        for _ in range(args.batches):
            data, _ = layer()
        elapsed = time.perf_counter() - start
        layer.close()
    n = args.batch * args.batches
    print(f"Data layer, {args.size}x{args.size} LMDB -> {tuple(data.shape)} with mirror, "
          f"crop {args.crop}, mean_file; {os.cpu_count()} CPUs, "
          f"{os.environ.get('CAFFE_COMPAT_DATA_WORKERS', 'default')} workers")
    rate = n / elapsed
    print(f"{rate:.0f} images/s ({elapsed / args.batches * 1000:.1f} ms per batch of "
          f"{args.batch}; consumer waited {layer.wait_seconds - waited:.2f} s of "
          f"{elapsed:.2f} s)")
    if args.vgg:
        consumed = vgg16_images_per_second(args.crop)
        print(f"VGG16 training consumes {consumed:.2f} images/s at {args.crop}x{args.crop} "
              f"(batch 8, fp32): the Data layer is {rate / consumed:.0f}x faster")


def vgg16_images_per_second(size: int, batch: int = 8) -> float:
    """One measured VGG16 forward+backward (after a warm-up), as images per second."""
    import torch
    sys.path.insert(0, str(Path(__file__).parent))
    from vgg16_train_step import time_steps, vgg16_prototxt
    from caffe_compat.formats.blob_io import read_text_proto
    from caffe_compat.engine.net.module import build_net
    net = build_net(read_text_proto(vgg16_prototxt(batch, size, 10), caffe_pb2.NetParameter),
                    phase=TRAIN)
    x = torch.randn(batch, 3, size, size)
    y = torch.zeros(batch)

    def step():
        loss, _ = net.forward_loss(data=x, label=y)
        loss.backward()
    return batch / (time_steps(step, 1) / 1000)


if __name__ == "__main__":
    main()
