"""The forks' own field names and numbers (docs/forks.md), so their prototxts and caffemodels parse."""
import pytest
from google.protobuf import text_format

from caffe_compat.proto import caffe_pb2

L = caffe_pb2.LayerParameter


def _number(message, field):
    return message.DESCRIPTOR.fields_by_name[field].number


@pytest.mark.parametrize("message,field,number", [
    # weiliu89/caffe branch ssd
    (L, "permute_param", 202), (L, "prior_box_param", 203), (L, "detection_output_param", 204),
    (L, "norm_param", 206),
    (caffe_pb2.NormalizeParameter, "across_spatial", 1), (caffe_pb2.NormalizeParameter, "eps", 4),
    (caffe_pb2.NormalizeParameter, "channel_shared", 3), (caffe_pb2.PermuteParameter, "order", 1),
    (caffe_pb2.PriorBoxParameter, "offset", 13), (caffe_pb2.PriorBoxParameter, "img_h", 8),
    (caffe_pb2.PriorBoxParameter, "step_w", 12), (caffe_pb2.PriorBoxParameter, "variance", 6),
    (caffe_pb2.DetectionOutputParameter, "keep_top_k", 7),
    (caffe_pb2.DetectionOutputParameter, "variance_encoded_in_target", 8),
    (caffe_pb2.DetectionOutputParameter, "confidence_threshold", 9),
    (caffe_pb2.DetectionOutputParameter, "save_file", 12),
    (caffe_pb2.NonMaximumSuppressionParameter, "eta", 3),
    # rbgirshick/caffe-fast-rcnn
    (L, "roi_pooling_param", 8266711), (caffe_pb2.ROIPoolingParameter, "spatial_scale", 3),
    # alexgkendall/caffe-segnet (bn_param its own; the two that collide with BVLC moved)
    (L, "bn_param", 45), (caffe_pb2.BNParameter, "bn_mode", 3), (caffe_pb2.BNParameter, "shift_filler", 2),
    (L, "upsample_param", 10137), (caffe_pb2.UpsampleParameter, "upsample_w", 7),
    (L, "dense_image_data_param", 10138), (caffe_pb2.DenseImageDataParameter, "crop_height", 12),
    # PSPNet / DeepLab (143 is BVLC's input_param: moved)
    (L, "interp_param", 10143), (caffe_pb2.InterpParameter, "pad_end", 6),
    (L, "shuffle_channel_param", 164), (L, "relu6_param", 100000),
    (caffe_pb2.PoolingParameter, "ceil_mode", 10013), (caffe_pb2.PoolingParameter, "round_mode", 13),
])
def test_fork_field_numbers(message, field, number):
    assert _number(message, field) == number


def test_fork_defaults():
    assert caffe_pb2.PriorBoxParameter().clip is False          # SSD's default
    assert caffe_pb2.PriorBoxParameter().flip is True
    assert caffe_pb2.NonMaximumSuppressionParameter().nms_threshold == pytest.approx(0.3)
    assert caffe_pb2.NormalizeParameter().channel_shared is True
    assert caffe_pb2.UpsampleParameter().scale == 2
    assert caffe_pb2.PoolingParameter().ceil_mode is True
    assert caffe_pb2.DetectionOutputParameter().code_type == caffe_pb2.PriorBoxParameter.CORNER


def test_fork_prototxt_fragments_parse():
    text = '''
      layer { name: "bn" type: "BN" bn_param { bn_mode: INFERENCE scale_filler { type: "constant" value: 1 } } }
      layer { name: "up" type: "Upsample" upsample_param { scale: 2 upsample_h: 9 upsample_w: 11 } }
      layer { name: "roi" type: "ROIPooling" roi_pooling_param { pooled_h: 6 pooled_w: 6 spatial_scale: 0.0625 } }
      layer { name: "i" type: "Interp" interp_param { zoom_factor: 8 pad_beg: 0 pad_end: 0 } }
      layer { name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }
      layer { name: "d" type: "DetectionOutput" detection_output_param { num_classes: 21
        save_output_param { label_map_file: "labelmap.prototxt" resize_param { resize_mode: WARP } } } }
    '''
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    assert net.layer[0].bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE
    assert not net.layer[4].pooling_param.ceil_mode


def test_segnet_caffemodel_with_colliding_numbers_still_decodes():
    """A SegNet caffemodel stores upsample_param at 137 (BVLC's embed_param): it must decode."""
    up = caffe_pb2.UpsampleParameter(scale=2, pad_out_h=True, upsample_h=10)
    raw = (caffe_pb2.LayerParameter(name="up", type="Upsample").SerializeToString()
           + bytes([0xCA, 0x08]) + bytes([len(up.SerializeToString())]) + up.SerializeToString())
    layer = caffe_pb2.LayerParameter.FromString(raw)     # field 137, wire type 2
    assert layer.name == "up"
