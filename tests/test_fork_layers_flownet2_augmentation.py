"""lmb-freiburg/flownet2's DataAugmentation at deploy time (its mean path): against OpenCV DNN's
DataAugmentation, closed-form means, and the fork's CustomCopyBlobs loading rules."""
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError
from caffe_compat.proto import caffe_pb2
from layer_utils import make_layer
from test_fork_layers_flownet2 import one_layer, rand, run_opencv


def blobs_only(path):
    """Keep each layer's name, type and blobs: OpenCV reads a caffemodel's layer fields too
    and fails on augmentation_param, which its proto lacks."""
    net = caffe_pb2.NetParameter.FromString(open(path, "rb").read())
    for lp in net.layer:
        kept = caffe_pb2.LayerParameter(name=lp.name, type=lp.type, blobs=lp.blobs)
        lp.Clear()
        lp.CopyFrom(kept)
    open(path, "wb").write(net.SerializeToString())


AUG = 'augmentation_param {{ max_multiplier: 1 augment_during_test: false recompute_mean: 1000 ' \
      'mean_per_pixel: {} translate {{ rand_type: "uniform_bernoulli" spread: 0.4 }} }}'


@pytest.mark.parametrize("per_pixel", ["true", "false"])
def test_data_augmentation_first_forward_matches_opencv(tmp_path, per_pixel):
    """A fresh layer's first forward subtracts this image's own mean; OpenCV's does so on
    every forward (it restarts its count at 0)."""
    rng = np.random.default_rng(12)
    feeds = {"img": rand(rng, 1, 3, 6, 7) + 2}
    path = one_layer(tmp_path, "DataAugmentation", AUG.format(per_pixel), feeds)
    net = caffe.Net(path, caffe.TEST)
    net.blobs["img"].data[...] = feeds["img"]
    ours = net.forward()["out"].copy()
    x = feeds["img"].astype(np.float64)
    mean = x if per_pixel == "true" else x.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(ours, x - mean, atol=1e-5)
    assert net.params["out"][0].data.reshape(-1)[0] == 1
    if per_pixel == "true":
        return
    # OpenCV's importer reads no augmentation_param (its defaults: recompute_mean 1, per
    # channel), so it gets the layer without one
    fresh = str(tmp_path / "fresh.caffemodel")
    caffe.Net(path, caffe.TEST).save(fresh)
    blobs_only(fresh)
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    cv_path = one_layer(cv_dir, "DataAugmentation", "", feeds)
    np.testing.assert_allclose(ours, run_opencv(cv_path, feeds, weights=fresh), atol=1e-5)


def test_data_augmentation_running_mean_then_frozen(tmp_path):
    rng = np.random.default_rng(13)
    body = AUG.format("false").replace("recompute_mean: 1000", "recompute_mean: 2")
    shape = (2, 3, 4, 5)
    path = one_layer(tmp_path, "DataAugmentation", body, {"img": np.zeros(shape)})
    net = caffe.Net(path, caffe.TEST)
    batches = [rand(rng, *shape) for _ in range(3)]
    outs = []
    for b in batches:
        net.blobs["img"].data[...] = b
        outs.append(net.forward()["out"].copy())
    image_means = [b.astype(np.float64).mean(axis=0) for b in batches]
    channel = ((image_means[0] + image_means[1]) / 2).mean(axis=(1, 2)).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(outs[2], batches[2] - channel, atol=1e-5)   # frozen after 2
    np.testing.assert_allclose(outs[0], batches[0] - image_means[0].mean(axis=(1, 2))
                               .reshape(1, 3, 1, 1), atol=1e-5)


def test_data_augmentation_loads_a_mean_of_another_size_as_the_fork(tmp_path):
    """A deploy net at another resolution than the training crops: blob 1 does not fit, so
    (per pixel) the stored image's channel means are spread over the new size."""
    rng = np.random.default_rng(14)
    train = one_layer(tmp_path, "DataAugmentation", AUG.format("true"),
                      {"img": np.zeros((1, 3, 4, 6))})
    net = caffe.Net(train, caffe.TEST)
    stored = rand(rng, 1, 3, 4, 6)
    net.params["out"][0].data[...] = 5000
    net.params["out"][1].data[...] = stored
    weights = str(tmp_path / "trained.caffemodel")
    net.save(weights)
    deploy_dir = tmp_path / "deploy"
    deploy_dir.mkdir()
    img = rand(rng, 1, 3, 7, 5)
    deploy = caffe.Net(one_layer(deploy_dir, "DataAugmentation", AUG.format("true"),
                                 {"img": img}), caffe.TEST, weights=weights)
    deploy.blobs["img"].data[...] = img
    out = deploy.forward()["out"]
    means = stored.astype(np.float64).mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(out, img - means, atol=1e-5)
    assert deploy.params["out"][0].data.reshape(-1)[0] == 5001     # counted, mean kept


def test_data_augmentation_refuses_cropping():
    with pytest.raises(LayerError, match="crop_width"):
        make_layer('name: "a" type: "DataAugmentation" augmentation_param { crop_width: 4 '
                   'crop_height: 4 }', [(1, 3, 8, 8)])
