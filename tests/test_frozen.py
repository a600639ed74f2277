"""TorchScript-frozen inference (engine/net/frozen.py): a layer a trace cannot keep runs after
the frozen prefix, so a frozen detector's detections follow its input."""
import pytest
import torch

from caffe_compat.engine.net.frozen import FrozenNet, frozen_for_inference, traceable
from caffe_compat.engine.net.plan import partition
from caffe_compat.engine.net.fuse import fused_for_inference
from caffe_compat.engine.net.module import build_net
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2


def _flat(blob: str) -> str:
    return (f'layer {{ name: "{blob}_perm" type: "Permute" bottom: "{blob}" top: "{blob}_perm" '
            'permute_param { order: 0 order: 2 order: 3 order: 1 } }\n'
            f'layer {{ name: "{blob}_flat" type: "Flatten" bottom: "{blob}_perm" '
            f'top: "{blob}_flat" }}\n')


def ssd_like() -> str:
    """One feature map, two priors per cell, three classes, SSD's DetectionOutput."""
    text = ('name: "tiny_ssd" layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 3 dim: 24 dim: 24 } } }\n')
    for name, bottom, n, stride in (("conv1", "data", 8, 2), ("loc", "conv1", 8, 1),
                                    ("conf", "conv1", 6, 1)):
        text += (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                 f'convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 stride: {stride} '
                 'weight_filler { type: "msra" } bias_filler { type: "gaussian" std: 0.1 } } }\n')
        if name == "conv1":
            text += 'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
    text += _flat("loc") + _flat("conf")
    text += ('layer { name: "conf_resh" type: "Reshape" bottom: "conf_flat" top: "conf_resh" '
             'reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }\n'
             'layer { name: "conf_sm" type: "Softmax" bottom: "conf_resh" top: "conf_sm" '
             'softmax_param { axis: 2 } }\n'
             'layer { name: "conf_out" type: "Flatten" bottom: "conf_sm" top: "conf_out" }\n'
             'layer { name: "prior" type: "PriorBox" bottom: "conv1" bottom: "data" top: "prior" '
             'prior_box_param { min_size: 6 aspect_ratio: 2 flip: false clip: false '
             'variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 2 offset: 0.5 } }\n'
             'layer { name: "det" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_out" '
             'bottom: "prior" top: "det" detection_output_param { num_classes: 3 '
             'share_location: true background_label_id: 0 nms_param { nms_threshold: 0.45 '
             'top_k: 50 } code_type: CENTER_SIZE keep_top_k: 20 confidence_threshold: 0.3 } }\n')
    return text


def _build(text: str, tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    torch.manual_seed(0)
    return build_net(read_text_proto(str(path), caffe_pb2.NetParameter), caffe_pb2.TEST,
                     source=str(path)).eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_detector_follows_its_input(tmp_path, channels_last):
    net = _build(ssd_like(), tmp_path)
    first, second = (torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(s))
                     for s in (1, 2))
    fused = fused_for_inference(net, channels_last=channels_last)
    frozen = frozen_for_inference(fused, [first])
    assert isinstance(frozen, FrozenNet)
    assert [step.fn.type for step in frozen.suffix] == ["DetectionOutput"]
    with torch.no_grad():
        want = [net(data=x)["det"] for x in (first, second)]
        got = [frozen(x)[0] for x in (first, second)]
    assert want[0].shape[2] > 1 and want[1].shape[2] > 1          # detections were kept
    assert want[0].shape != want[1].shape or not torch.equal(want[0], want[1])
    for w, g in zip(want, got):
        assert w.shape == g.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_partition_keeps_readers_of_untraceable_tops_out(tmp_path):
    text = ssd_like() + 'layer { name: "after" type: "Power" bottom: "det" top: "after" }\n'
    net = _build(text, tmp_path)
    fused = fused_for_inference(net)
    prefix, suffix, outputs = partition(fused.plan, fused.input_names, fused.output_names,
                                        traceable)
    assert [s.name for s in suffix] == ["det", "after"]
    assert set(outputs) == {"loc_flat", "conf_out", "prior"}
    assert all(traceable(s) for s in prefix)


def test_net_starting_with_an_untraceable_layer_is_refused(tmp_path):
    text = ('name: "roi" layer { name: "data" type: "Input" top: "data" top: "rois" '
            'input_param { shape { dim: 1 dim: 2 dim: 6 dim: 6 } shape { dim: 1 dim: 5 } } }\n'
            'layer { name: "pool" type: "ROIPooling" bottom: "data" bottom: "rois" top: "pool" '
            'roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 } }\n')
    net = _build(text, tmp_path)
    fused = fused_for_inference(net)
    with pytest.raises(RuntimeError, match="'roi'.*pool"):
        frozen_for_inference(fused, [torch.randn(1, 2, 6, 6), torch.zeros(1, 5)])


def test_torchscript_export_refuses_a_detector(tmp_path):
    from caffe_compat.commands.common import CliError
    from caffe_compat.commands.export import export
    proto = tmp_path / "ssd.prototxt"
    proto.write_text(ssd_like())
    out = tmp_path / "ssd.pt"
    with pytest.raises(CliError, match="'det' \\(DetectionOutput\\).*cannot be traced"):
        export(str(proto), None, "torchscript", str(out))
    assert not out.exists()


def test_max_pooling_net_freezes(tmp_path):
    """The specialised max pooling traces into a graph TorchScript can optimise (its
    clamp_(min=...) made optimize_for_inference fail an internal assert: LeNet, MTCNN)."""
    text = ('name: "pool" layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 2 dim: 9 dim: 9 } } }\n'
            'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
            'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n')
    net = _build(text, tmp_path)
    x = torch.randn(1, 2, 9, 9)
    frozen = frozen_for_inference(fused_for_inference(net), [x])
    with torch.no_grad():
        torch.testing.assert_close(frozen(x)[0], net(data=x)["pool"], rtol=0, atol=0)


FILTERED = ('name: "filtered" layer { name: "in" type: "Input" top: "data" top: "sel" '
            'input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            'inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }\n'
            'layer { name: "keep" type: "Filter" bottom: "ip" bottom: "sel" top: "kept" }\n')


def test_a_filter_is_run_after_the_frozen_graph_for_each_selector(tmp_path):
    """Filter's row count follows each selector (it declares itself untraceable for CUDA
    graphs, whose capture needs the count on the host, and runs after the frozen graph)."""
    net = _build(FILTERED, tmp_path)
    data = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    frozen = frozen_for_inference(fused_for_inference(net),
                                  [data, torch.tensor([1.0, 0.0, 1.0, 1.0])])
    for sel in ([0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]):
        sel = torch.tensor(sel)
        with torch.no_grad():
            want = net(data=data, sel=sel)["kept"]
            got = frozen(data, sel)[0]
        assert got.shape == want.shape == (int(sel.sum()), 2)
        torch.testing.assert_close(got, want)


def test_cuda_graphs_are_not_tried_on_a_plan_with_a_host_step(tmp_path):
    """A CUDA net with DetectionOutput runs eagerly (named) rather than attempt a capture
    that fails part-way; checked here on the plan, where no GPU is needed."""
    from caffe_compat.engine.net.inference_cache import _host_step
    detector = fused_for_inference(_build(ssd_like(), tmp_path))
    assert _host_step(detector).name == "det"
    plain = ssd_like().split('layer { name: "det"')[0]
    assert _host_step(fused_for_inference(_build(plain, tmp_path))) is None
