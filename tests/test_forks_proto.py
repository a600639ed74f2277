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
    # lmb-freiburg/flownet2 (150 is DeepLab's unique_label_param here: moved)
    (L, "correlation_param", 20060), (caffe_pb2.CorrelationParameter, "correlation_type", 15),
    (caffe_pb2.CorrelationParameter, "stride_2", 6), (L, "resample_param", 155),
    (caffe_pb2.ResampleParameter, "antialias", 4), (L, "flow_warp_param", 159),
    (L, "accum_param", 160), (caffe_pb2.AccumParameter, "have_reference", 4),
    (L, "augmentation_param", 20061), (L, "coeff_schedule_param", 20062),
    (caffe_pb2.AugmentationParameter, "recompute_mean", 5),
    (caffe_pb2.AugmentationParameter, "mean_per_pixel", 7),
    (caffe_pb2.AugmentationParameter, "translate", 11),
    (caffe_pb2.RandomGeneratorParameter, "spread", 5),
    (L, "shuffle_channel_param", 164), (L, "relu6_param", 100000),
    (caffe_pb2.PoolingParameter, "ceil_mode", 10013),
    (caffe_pb2.PoolingParameter, "round_mode", 13),
    # SSD's data, loss and solver messages (eval_type / ap_version collide with BVLC: moved)
    (L, "annotated_data_param", 200), (L, "multibox_loss_param", 201),
    (L, "detection_evaluate_param", 205), (L, "video_data_param", 207),
    (caffe_pb2.LabelMapItem, "display_name", 3), (caffe_pb2.LabelMap, "item", 1),
    (caffe_pb2.BatchSampler, "max_trials", 5),
    (caffe_pb2.SampleConstraint, "max_object_coverage", 6),
    (caffe_pb2.EmitConstraint, "emit_overlap", 2),
    (caffe_pb2.MultiBoxLossParameter, "code_type", 14),
    (caffe_pb2.MultiBoxLossParameter, "encode_variance_in_target", 16),
    (caffe_pb2.MultiBoxLossParameter, "use_prior_for_nms", 23),
    (caffe_pb2.TransformationParameter, "resize_param", 8),
    (caffe_pb2.TransformationParameter, "emit_constraint", 10),
    (caffe_pb2.TransformationParameter, "expand_param", 14),
    (caffe_pb2.DistortionParameter, "random_order_prob", 11),
    (caffe_pb2.NoiseParameter, "convert_to_lab", 13),
    (caffe_pb2.AnnotatedDatum, "annotation_group", 3), (caffe_pb2.NormalizedBBox, "size", 8),
    (caffe_pb2.SolverParameter, "eval_type", 10041),
    (caffe_pb2.SolverParameter, "ap_version", 10042),
    (caffe_pb2.SolverParameter, "layer_wise_reduce", 41),
    (caffe_pb2.SolverParameter, "weights", 42),
    (caffe_pb2.SolverParameter, "show_per_class_result", 44),
    (caffe_pb2.SolverState, "minimum_loss", 5),
    # SegNet's class weighting (3 is BVLC's normalization: moved) and Bayesian SegNet's dropout;
    # Fast R-CNN's scale_train keeps 2, which SegNet also used
    (caffe_pb2.LossParameter, "weight_by_label_freqs", 10003),
    (caffe_pb2.LossParameter, "class_weighting", 4), (caffe_pb2.LossParameter, "normalization", 3),
    (caffe_pb2.DropoutParameter, "scale_train", 2),
    (caffe_pb2.DropoutParameter, "sample_weights_test", 10002),
    (L, "smooth_l1_loss_param", 8266712), (caffe_pb2.SmoothL1LossParameter, "sigma", 1),
    # the channel-pruning fork's ImageData
    (caffe_pb2.ImageDataParameter, "new_dim", 13), (caffe_pb2.ImageDataParameter, "bicubic", 14),
    # daijifeng001/caffe-rfcn (10001 is this project's landmark_heatmap_param: moved) and
    # gklz1982/caffe-yolov2 (147 is BVLC's swish_param: moved)
    (L, "psroi_pooling_param", 20001), (caffe_pb2.PSROIPoolingParameter, "group_size", 3),
    (caffe_pb2.PSROIPoolingParameter, "output_dim", 2),
    (L, "reorg_param", 10147), (caffe_pb2.ReorgParameter, "reverse", 2),
    # R-FCN's OHEM (its own 10000) and loss normalizer (its 4 is SegNet's class_weighting:
    # moved); caffe-face's center loss (147 is BVLC's swish_param, 10147 reorg_param: moved)
    (L, "box_annotator_ohem_param", 10000), (caffe_pb2.BoxAnnotatorOHEMParameter, "ignore_label", 2),
    (caffe_pb2.LossParameter, "pre_fixed_normalizer", 20021),
    (L, "center_loss_param", 20020), (caffe_pb2.CenterLossParameter, "axis", 3),
    (caffe_pb2.CenterLossParameter, "center_filler", 2),
    # eric612/MobileNet-YOLO and openvinotoolkit/training_toolbox_caffe (their own numbers)
    (L, "yolov3_detection_output_param", 602),
    (caffe_pb2.Yolov3DetectionOutputParameter, "anchors_scale", 6),
    (caffe_pb2.Yolov3DetectionOutputParameter, "mask", 8),
    (L, "region_param", 214), (caffe_pb2.RegionParameter, "num", 3),
    # Faster R-CNN's C++ Proposal (OpenCV's 201 is SSD's multibox_loss_param: moved)
    (L, "proposal_param", 20040), (caffe_pb2.ProposalParameter, "feat_stride", 1),
    (caffe_pb2.ProposalParameter, "scale", 5), (caffe_pb2.ProposalParameter, "nms_thresh", 8),
    # hszhao/PSPNet's BN fields in SegNet's BNParameter (PSPNet's 1-3 are SegNet's: moved)
    (caffe_pb2.BNParameter, "slope_filler", 20030), (caffe_pb2.BNParameter, "bias_filler", 20031),
    (caffe_pb2.BNParameter, "momentum", 20032), (caffe_pb2.BNParameter, "eps", 4),
    (caffe_pb2.BNParameter, "frozen", 5), (caffe_pb2.BNParameter, "engine", 6),
    (caffe_pb2.BNParameter, "scale_filler", 1),
    (caffe_pb2.BatchNormParameter, "update_global_stats", 4),
    # DeepLab v2 (144, 145 are BVLC's crop_param and parameter_param; its transform fields
    # 8-10 are SSD's: moved)
    (L, "seg_accuracy_param", 10144), (L, "mat_write_param", 10145), (L, "mat_read_param", 151),
    (caffe_pb2.SegAccuracyParameter, "reset", 3), (caffe_pb2.MatWriteParameter, "period", 4),
    (caffe_pb2.MatReadParameter, "batch_size", 4),
    (L, "bias_channel_param", 149), (L, "unique_label_param", 150),
    (caffe_pb2.BiasChannelParameter, "background_label", 6),
    (caffe_pb2.UniqueLabelParameter, "force_label", 3),
    # its domain_transform_param 147 is BVLC's swish_param (10147 reorg_param): moved
    (L, "domain_transform_param", 20100), (caffe_pb2.DomainTransformParameter, "num_iter", 1),
    (caffe_pb2.DomainTransformParameter, "spatial_sigma", 2),
    (caffe_pb2.DomainTransformParameter, "range_sigma", 3),
    (caffe_pb2.DomainTransformParameter, "min_weight", 4),
    # and adaptive_bias_channel_param 148 is BVLC's clip_param: moved
    (L, "adaptive_bias_channel_param", 20101),
    (caffe_pb2.AdaptiveBiasChannelParameter, "bg_portion", 2),
    (caffe_pb2.AdaptiveBiasChannelParameter, "margin_others", 5),
    (caffe_pb2.ImageDataParameter, "ignore_label", 15), (caffe_pb2.ImageDataParameter, "label_type", 16),
    (caffe_pb2.TransformationParameter, "scale_factors", 20033),
    (caffe_pb2.TransformationParameter, "crop_width", 20034),
    (caffe_pb2.TransformationParameter, "crop_height", 20035),
    # happynear/caffe-windows and xialuxi/arcface-caffe (their own numbers); sphereface's
    # margin_inner_product_param is 147, BVLC's swish_param: moved
    (L, "label_specific_add_param", 241), (caffe_pb2.LabelSpecificAddParameter, "iteration", 8),
    (caffe_pb2.LabelSpecificAddParameter, "bias_base", 3),
    (L, "combined_margin_param", 156), (caffe_pb2.CombinedMarginParameter, "transform_test", 4),
    (L, "cosin_add_m_param", 179), (caffe_pb2.CosinAddmParameter, "transform_test", 2),
    # the softmax FocalLoss: arcface-caffe's 155 is FlowNet's resample_param here, moved;
    # inside its message zimenglan-sysu-512/Focal-Loss' numbers
    (L, "focal_loss_param", 20080), (caffe_pb2.FocalLossParameter, "type", 1),
    (caffe_pb2.FocalLossParameter, "gamma", 2), (caffe_pb2.FocalLossParameter, "alpha", 3),
    (caffe_pb2.FocalLossParameter, "beta", 4),
    (L, "margin_inner_product_param", 20050),
    (caffe_pb2.MarginInnerProductParameter, "lambda_min", 9),
    (caffe_pb2.MarginInnerProductParameter, "weight_filler", 3),
    # happynear/caffe-windows' Normalize: its 214 is region_param here, moved; its IP field
    # NVIDIA/caffe's DetectNet (its own numbers, free here)
    (L, "detectnet_groundtruth_param", 6801), (L, "detectnet_augmentation_param", 6802),
    (caffe_pb2.DetectNetGroundTruthParameter, "object_class", 13),
    (caffe_pb2.DetectNetGroundTruthParameter, "crop_bboxes", 12),
    (caffe_pb2.DetectNetAugmentationParameter, "desaturation_max", 13),
    (L, "normalize_param", 20070), (caffe_pb2.CaffeWindowsNormalizeParameter, "bp_norm", 3),
    (caffe_pb2.CaffeWindowsNormalizeParameter, "normalize_type", 1),
    (caffe_pb2.InnerProductParameter, "normalize", 7),
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
    assert caffe_pb2.BoxAnnotatorOHEMParameter().ignore_label == -1        # R-FCN's defaults
    assert caffe_pb2.LossParameter().pre_fixed_normalizer == 1
    assert caffe_pb2.LossParameter.PRE_FIXED == 20022                     # R-FCN: 3 (our NONE)
    assert caffe_pb2.CenterLossParameter().axis == 1                      # caffe-face's
    assert caffe_pb2.BNParameter().momentum == pytest.approx(0.9)        # PSPNet's defaults
    assert caffe_pb2.BNParameter().eps == pytest.approx(1e-5)
    assert caffe_pb2.ImageDataParameter().ignore_label == 255            # DeepLab's
    assert caffe_pb2.ImageDataParameter().label_type == caffe_pb2.ImageDataParameter.IMAGE
    assert caffe_pb2.SegAccuracyParameter().reset is True
    assert caffe_pb2.CombinedMarginParameter().m1 == 4                  # arcface-caffe's
    assert caffe_pb2.CombinedMarginParameter().m3 == pytest.approx(0.35)
    assert caffe_pb2.CosinAddmParameter().m == pytest.approx(0.5)
    F = caffe_pb2.FocalLossParameter                                     # zimenglan-sysu-512's
    assert (F().type, F().gamma, F().alpha, F().beta) == (F.ORIGIN, 2, 0.25, 1)
    assert caffe_pb2.LabelSpecificAddParameter().bias_power == 1         # caffe-windows'
    assert caffe_pb2.CaffeWindowsNormalizeParameter().normalize_type == "L2"
    M = caffe_pb2.MarginInnerProductParameter                             # sphereface's
    assert (M().type, M().base, M().power, M().axis, M.QUADRUPLE) == (M.SINGLE, 1, 1, 1, 3)


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


def test_the_fork_tables_never_name_what_caffe_proto_defines():
    """forks.py lists only what is missing: each listed field is absent from its message and
    each listed type is unregistered, so an error never calls a supported field unsupported."""
    import caffe_compat  # noqa: F401  (registers every layer)
    from caffe_compat.engine.layers.base import layer_types
    from caffe_compat.formats.forks import FORK_FIELDS, FORK_TYPES
    for message, fields in FORK_FIELDS.items():
        defined = getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name
        assert not set(fields) & set(defined), message
    assert not set(FORK_TYPES) & set(layer_types())


@pytest.mark.parametrize("reason, expected", [
    ('Message type "caffe.LayerParameter" has no field named "dense_crf_param".', "DeepLab v2"),
    ('Message type "caffe.BNParameter" has no field named "frozn".', "no supported fork defines it"),
    ('Message type "caffe.LayerParameter" has no field named "yolov3_param".', "MobileNet-YOLO"),
    ('Message type "caffe.RegionParameter" has no field named "side".', "another YOLOv2 port"),
    ('Message type "caffe.FocalLossParameter" has no field named "axis".', "chuanqi305/FocalLoss"),
    ('Message type "caffe.DropoutParameter" has no field named "scale_tran".',
     "no supported fork defines it"),
    ('Message type "caffe.InnerProductParameter" has no field named "normalise".',
     "no supported fork defines it"),
])
def test_unknown_nested_fields_name_their_fork(reason, expected):
    from caffe_compat.formats.forks import explain_unknown_field
    assert expected in explain_unknown_field(reason)[2]
