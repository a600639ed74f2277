"""Classification/deploy pycaffe scripts of other repositories, run unchanged on our own
small nets: NVIDIA/DIGITS examples/classification/example.py, GilLevi/AgeGenderDeepLearning's
demo notebooks, BVLC/caffe python/classify.py, python/detect.py, examples/web_demo/app.py,
examples/pycaffe/tools.py and the 00-classification notebook, and the Datum/LMDB reading
scripts do by hand. Each flow is our own script in the style of theirs; results are checked
against numpy in float64 (the net: 1x1 convolution, global average, InnerProduct, Softmax)."""
import csv
import glob
import io as stdio

import cv2
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

import caffe
from caffe.proto import caffe_pb2

LEGACY = "name: 'tiny'\ninput: 'data'\ninput_dim: {n}\ninput_dim: 3\ninput_dim: {s}\ninput_dim: {s}\n"
SHAPED = "name: 'tiny'\ninput: 'data'\ninput_shape {{ dim: {n} dim: 3 dim: {s} dim: {s} }}\n"
LAYERS = """layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: 'pool' type: 'Pooling' bottom: 'conv1' top: 'pool'
  pooling_param { pool: AVE global_pooling: true } }
layer { name: 'fc' type: 'InnerProduct' bottom: 'pool' top: 'fc' inner_product_param { num_output: 3 } }
layer { name: 'prob' type: 'Softmax' bottom: 'fc' top: 'prob' }
"""


def _model(tmp_path, header=LEGACY, batch=1, size=8, seed=0):
    """deploy.prototxt and a caffemodel of random weights; the weights in float64."""
    deploy = tmp_path / f"deploy_{batch}.prototxt"
    deploy.write_text(header.format(n=batch, s=size) + LAYERS)
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.RandomState(seed)
    for param in net.params.values():
        for blob in param:
            blob.data[...] = rng.uniform(-0.05, 0.05, blob.data.shape)
    net.save(str(tmp_path / "tiny.caffemodel"))
    weights = {k: [b.data.astype(np.float64) for b in v] for k, v in net.params.items()}
    return str(deploy), str(tmp_path / "tiny.caffemodel"), weights


def _conv1(weights, batch):
    w, b = weights["conv1"]
    return np.einsum("oc,nchw->nohw", w[:, :, 0, 0], batch) + b[None, :, None, None]


def _probs(weights, batch):
    """The net's softmax for an N x 3 x H x W float64 batch."""
    fc_w, fc_b = weights["fc"]
    z = _conv1(weights, batch).mean((2, 3)) @ fc_w.T + fc_b
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _write_mean(path, mean):
    """A mean.binaryproto as compute_image_mean writes it: legacy num/channels/height/width."""
    blob = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1],
                               width=mean.shape[2])
    blob.data.extend(mean.ravel().tolist())
    path.write_bytes(blob.SerializeToString())
    return str(path)


def _rgb_images(tmp_path, n, shape=(8, 8), seed=1, ext="png"):
    rng = np.random.RandomState(seed)
    paths = []
    for i in range(n):
        rgb = rng.randint(0, 256, shape + (3,)).astype(np.uint8)
        paths.append(str(tmp_path / f"im{i}.{ext}"))
        cv2.imwrite(paths[-1], rgb[:, :, ::-1])
    return paths


# -- NVIDIA/DIGITS examples/classification/example.py -----------------------------------
def _digits_transformer(deploy_file, mean_file):
    network = caffe_pb2.NetParameter()
    with open(deploy_file) as infile:
        text_format.Merge(infile.read(), network)
    if network.input_shape:
        dims = network.input_shape[0].dim
    else:
        dims = network.input_dim[:4]
    t = caffe.io.Transformer(inputs={'data': dims})
    t.set_transpose('data', (2, 0, 1))
    if dims[1] == 3:
        t.set_channel_swap('data', (2, 1, 0))
    with open(mean_file, 'rb') as infile:
        blob = caffe_pb2.BlobProto()
        blob.MergeFromString(infile.read())
        if blob.HasField('shape'):
            blob_dims = blob.shape.dim
        elif blob.HasField('num') and blob.HasField('channels') and \
                blob.HasField('height') and blob.HasField('width'):
            blob_dims = (blob.num, blob.channels, blob.height, blob.width)
        else:
            raise ValueError('blob does not provide shape or 4d dimensions')
        pixel = np.reshape(blob.data, blob_dims[1:]).mean(1).mean(1)
        t.set_mean('data', pixel)
    return t


def _digits_forward_pass(images, net, transformer, batch_size):
    caffe_images = np.array([im[:, :, np.newaxis] if im.ndim == 2 else im for im in images])
    dims = transformer.inputs['data'][1:]
    scores = None
    for chunk in [caffe_images[x:x + batch_size] for x in range(0, len(caffe_images), batch_size)]:
        new_shape = (len(chunk),) + tuple(dims)
        if net.blobs['data'].data.shape != new_shape:
            net.blobs['data'].reshape(*new_shape)
        for index, image in enumerate(chunk):
            net.blobs['data'].data[index] = transformer.preprocess('data', image)
        output = net.forward()[net.outputs[-1]]
        scores = np.copy(output) if scores is None else np.vstack((scores, output))
    return scores


@pytest.mark.parametrize("header", [LEGACY, SHAPED])
def test_digits_example_classifies_with_its_own_transformer(tmp_path, header):
    deploy, model, weights = _model(tmp_path, header)
    mean = np.random.RandomState(2).uniform(90, 140, (3, 8, 8)).astype(np.float32)
    mean_file = _write_mean(tmp_path / "mean.binaryproto", mean)
    caffe.set_mode_cpu()
    net = caffe.Net(deploy, model, caffe.TEST)
    transformer = _digits_transformer(deploy, mean_file)
    _, channels, height, width = transformer.inputs['data']
    assert (channels, height, width) == (3, 8, 8)
    files = _rgb_images(tmp_path, 5, (11, 9))
    images = [np.array(Image.open(f).convert('RGB').resize((width, height), Image.BILINEAR))
              for f in files]
    scores = _digits_forward_pass(images, net, transformer, batch_size=2)
    assert scores.shape == (5, 3) and net.blobs['data'].data.shape == (1, 3, 8, 8)
    pixel = mean.astype(np.float64).mean(1).mean(1)
    batch = np.array(images, np.float64)[..., ::-1].transpose(0, 3, 1, 2) - pixel[:, None, None]
    np.testing.assert_allclose(scores, _probs(weights, batch), rtol=1e-5)
    indices = (-scores).argsort()[:, :5]
    assert indices.shape == (5, 3)


# -- GilLevi/AgeGenderDeepLearning AgeGenderDemo / EmotiW_Demo notebooks -----------------
def test_age_gender_demo_classifier_with_a_binaryproto_mean(tmp_path):
    skimage_transform = pytest.importorskip("skimage.transform")
    deploy, model, weights = _model(tmp_path, batch=10)
    big_mean = np.random.RandomState(3).uniform(60, 160, (3, 10, 10)).astype(np.float32)
    mean_filename = _write_mean(tmp_path / "mean.binaryproto", big_mean)
    proto_data = open(mean_filename, "rb").read()
    a = caffe.io.caffe_pb2.BlobProto.FromString(proto_data)
    mean = caffe.io.blobproto_to_array(a)[0]
    assert mean.shape == (3, 10, 10) and mean.dtype == np.float64
    age_net = caffe.Classifier(deploy, model, mean=mean, channel_swap=(2, 1, 0),
                               raw_scale=255, image_dims=(10, 10))
    input_image = caffe.io.load_image(_rgb_images(tmp_path, 1, (13, 12))[0])
    prediction = age_net.predict([input_image])
    assert prediction.shape == (1, 3) and 0 <= prediction[0].argmax() < 3
    # pycaffe: the 10x10 mean squeezed to 8x8 by skimage, the image resized the same way
    lo, hi = mean.min(), mean.max()
    mean8 = skimage_transform.resize(((mean - lo) / (hi - lo)).transpose(1, 2, 0), (8, 8),
                                     order=1, mode="constant").transpose(2, 0, 1) * (hi - lo) + lo
    lo, hi = input_image.min(), input_image.max()
    resized = skimage_transform.resize((input_image - lo) / (hi - lo), (10, 10), order=1,
                                       mode="constant") * (hi - lo) + lo
    crops = [resized[y:y + 8, x:x + 8] for y, x in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
    crops += [c[:, ::-1] for c in crops]
    batch = np.array(crops, np.float64)[..., ::-1].transpose(0, 3, 1, 2) * 255 - mean8
    np.testing.assert_allclose(prediction[0], _probs(weights, batch).mean(0), rtol=1e-4)
    filters = age_net.params['conv1'][0].data[:49]
    assert filters.transpose(0, 2, 3, 1).shape == (4, 1, 1, 3)
    feat = age_net.blobs['conv1'].data[4, :49]          # the centre crop of the last batch
    np.testing.assert_allclose(feat, _conv1(weights, batch[4:5])[0], rtol=1e-4, atol=1e-4)
    centre = age_net.predict([input_image], oversample=False)
    np.testing.assert_allclose(centre.reshape(1, 3), _probs(weights, batch[4:5]), rtol=1e-4)
    assert centre.argmax() == _probs(weights, batch[4:5]).argmax()


# -- BVLC/caffe python/classify.py ------------------------------------------------------
def _classify_main(model_def, pretrained_model, input_file, output_file, mean_file,
                   center_only=False, images_dim='10,10', channel_swap='2,1,0',
                   input_scale=None, raw_scale=255.0, ext='jpg'):
    image_dims = [int(s) for s in images_dim.split(',')]
    mean = np.load(mean_file) if mean_file else None
    channel_swap = [int(s) for s in channel_swap.split(',')] if channel_swap else None
    caffe.set_mode_cpu()
    classifier = caffe.Classifier(model_def, pretrained_model, image_dims=image_dims,
                                  mean=mean, input_scale=input_scale, raw_scale=raw_scale,
                                  channel_swap=channel_swap)
    if input_file.endswith('npy'):
        inputs = np.load(input_file)
    else:
        inputs = [caffe.io.load_image(im_f) for im_f in sorted(glob.glob(input_file + '/*.' + ext))]
    predictions = classifier.predict(inputs, not center_only)
    np.save(output_file, predictions)
    return inputs


def test_bvlc_classify_py_on_an_npy_and_a_folder(tmp_path):
    deploy, model, weights = _model(tmp_path, batch=4)
    mean = np.random.RandomState(4).uniform(100, 120, (3, 8, 8))
    np.save(tmp_path / "mean.npy", mean)
    (tmp_path / "imgs").mkdir()
    _rgb_images(tmp_path / "imgs", 3, (8, 8), ext="png")
    inputs = _classify_main(deploy, model, str(tmp_path / "imgs"), str(tmp_path / "out.npy"),
                            str(tmp_path / "mean.npy"), center_only=True, images_dim='8,8',
                            input_scale=0.5, ext='png')
    got = np.load(tmp_path / "out.npy")
    assert got.shape == (3, 3)
    batch = (np.array(inputs, np.float64)[..., ::-1].transpose(0, 3, 1, 2) * 255 - mean) * 0.5
    np.testing.assert_allclose(got.reshape(3, 3), _probs(weights, batch), rtol=1e-5)
    np.save(tmp_path / "in.npy", np.array(inputs))
    _classify_main(deploy, model, str(tmp_path / "in.npy"), str(tmp_path / "ten.npy"),
                   str(tmp_path / "mean.npy"), images_dim='8,8', input_scale=0.5)
    ten = np.load(tmp_path / "ten.npy")
    assert ten.shape == (3, 3)                    # 10 crops of an 8x8 image: all the image
    flips = np.concatenate([batch] * 5 + [batch[..., ::-1]] * 5)
    expected = _probs(weights, flips).reshape(10, 3, 3).mean(0)
    np.testing.assert_allclose(ten, expected, rtol=1e-5)


# -- BVLC/caffe examples/00-classification.ipynb ----------------------------------------
def test_00_classification_notebook_idioms(tmp_path):
    deploy, model, weights = _model(tmp_path, SHAPED, batch=1)
    net = caffe.Net(deploy, model, caffe.TEST)
    np.save(tmp_path / "mean.npy", np.random.RandomState(5).uniform(100, 130, (3, 16, 16)))
    mu = np.load(tmp_path / "mean.npy")
    mu = mu.mean(1).mean(1)
    transformer = caffe.io.Transformer({'data': net.blobs['data'].data.shape})
    transformer.set_transpose('data', (2, 0, 1))
    transformer.set_mean('data', mu)
    transformer.set_raw_scale('data', 255)
    transformer.set_channel_swap('data', (2, 1, 0))
    net.blobs['data'].reshape(5, 3, 8, 8)
    image = caffe.io.load_image(_rgb_images(tmp_path, 1)[0])
    transformed_image = transformer.preprocess('data', image)
    net.blobs['data'].data[...] = transformed_image           # broadcast to the batch
    output = net.forward()
    output_prob = output['prob'][0]
    batch = image.astype(np.float64)[None, ..., ::-1].transpose(0, 3, 1, 2) * 255 - \
        mu[:, None, None]
    expected = _probs(weights, batch)[0]
    np.testing.assert_allclose(output_prob, expected, rtol=1e-5)
    assert output['prob'].shape == (5, 3) and (output['prob'] == output_prob).all()
    (tmp_path / "synset_words.txt").write_text("n01 cat\nn02 dog\nn03 tabby, cat\n")
    labels = np.loadtxt(str(tmp_path / "synset_words.txt"), str, delimiter='\t')
    top_inds = output_prob.argsort()[::-1][:5]
    assert list(labels[top_inds]) == list(labels[np.argsort(-expected)])
    assert [(k, v.data.shape) for k, v in net.blobs.items()] == [
        ('data', (5, 3, 8, 8)), ('conv1', (5, 4, 8, 8)), ('pool', (5, 4, 1, 1)),
        ('fc', (5, 3)), ('prob', (5, 3))]
    assert [(k, v[0].data.shape, v[1].data.shape) for k, v in net.params.items()] == [
        ('conv1', (4, 3, 1, 1), (4,)), ('fc', (3, 4), (3,))]
    feat = net.blobs['conv1'].data[0, :36]
    np.testing.assert_allclose(feat, _conv1(weights, batch)[0], rtol=1e-5, atol=1e-4)
    assert net.blobs['conv1'].count == 5 * 4 * 8 * 8 and net.blobs['pool'].width == 1
    assert list(net._layer_names) == ['input', 'conv1', 'pool', 'fc', 'prob']   # upgraded
