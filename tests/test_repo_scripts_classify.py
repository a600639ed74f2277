"""Classification scripts of other repositories (NVIDIA/DIGITS, GilLevi/AgeGenderDeepLearning,
BVLC/caffe's classify.py, detect.py, web_demo, pycaffe/tools.py, 00-classification, Datum/LMDB
reading by hand): our own scripts in their style, unchanged calls through ``import caffe``,
checked against numpy in float64 (net: 1x1 conv, global average, InnerProduct, Softmax)."""
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
from caffe_compat.formats.blob_io import write_blobproto   # compute_image_mean's layout

LEGACY = "name: 'tiny'\ninput: 'data'\ninput_dim: {n}\ninput_dim: {c}\ninput_dim: {s}\ninput_dim: {s}\n"
SHAPED = "name: 'tiny'\ninput: 'data'\ninput_shape {{ dim: {n} dim: {c} dim: {s} dim: {s} }}\n"
LAYERS = """layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: 'pool' type: 'Pooling' bottom: 'conv1' top: 'pool'
  pooling_param { pool: AVE global_pooling: true } }
layer { name: 'fc' type: 'InnerProduct' bottom: 'pool' top: 'fc' inner_product_param { num_output: 3 } }
layer { name: 'prob' type: 'Softmax' bottom: 'fc' top: 'prob' }
"""


def _model(tmp_path, header=LEGACY, batch=1, size=8, seed=0, channels=3):
    """deploy.prototxt and a caffemodel of random weights; the weights in float64."""
    deploy = tmp_path / f"deploy_{batch}.prototxt"
    deploy.write_text(header.format(n=batch, c=channels, s=size) + LAYERS)
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
    """The net's softmax for an N x C x H x W float64 batch."""
    fc_w, fc_b = weights["fc"]
    z = _conv1(weights, batch).mean((2, 3)) @ fc_w.T + fc_b
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _rgb_images(tmp_path, n, shape=(8, 8), seed=1, ext="png"):
    rng = np.random.RandomState(seed)
    paths = []
    for i in range(n):
        rgb = rng.randint(0, 256, shape + (3,)).astype(np.uint8)
        paths.append(str(tmp_path / f"im{i}.{ext}"))
        cv2.imwrite(paths[-1], rgb[:, :, ::-1])
    return paths


def _ten_crops(image):
    """pycaffe's oversample of one 10x10 (H, W, RGB) image to 8x8, as a float64 BGR batch."""
    crops = [image[y:y + 8, x:x + 8] for y, x in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
    crops += [c[:, ::-1] for c in crops]
    return np.array(crops, np.float64)[..., ::-1].transpose(0, 3, 1, 2)


# -- NVIDIA/DIGITS examples/classification/example.py -----------------------------------
def _digits_transformer(deploy_file, mean_file):
    network = caffe_pb2.NetParameter()
    with open(deploy_file) as infile:
        text_format.Merge(infile.read(), network)
    dims = network.input_shape[0].dim if network.input_shape else network.input_dim[:4]
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


@pytest.mark.parametrize("header, channels, mode", [(LEGACY, 3, 'RGB'), (SHAPED, 3, 'RGB'),
                                                   (SHAPED, 1, 'L')])
def test_digits_example_classifies_with_its_own_transformer(tmp_path, header, channels, mode):
    deploy, model, weights = _model(tmp_path, header, channels=channels)
    mean = np.random.RandomState(2).uniform(90, 140, (channels, 8, 8)).astype(np.float32)
    write_blobproto(mean_file := str(tmp_path / "mean.binaryproto"), mean)
    caffe.set_mode_cpu()
    net = caffe.Net(deploy, model, caffe.TEST)
    transformer = _digits_transformer(deploy, mean_file)
    _, c, height, width = transformer.inputs['data']
    assert (c, height, width) == (channels, 8, 8)
    files = _rgb_images(tmp_path, 5, (11, 9))
    images = [np.array(Image.open(f).convert(mode).resize((width, height), Image.BILINEAR))
              for f in files]
    scores = _digits_forward_pass(images, net, transformer, batch_size=2)
    assert scores.shape == (5, 3) and net.blobs['data'].data.shape == (1, channels, 8, 8)
    pixel = mean.astype(np.float64).mean(1).mean(1)
    batch = np.array(images, np.float64).reshape(5, 8, 8, -1)[..., ::-1].transpose(0, 3, 1, 2)
    batch -= pixel[:, None, None]
    np.testing.assert_allclose(scores, _probs(weights, batch), rtol=1e-5)


# -- GilLevi/AgeGenderDeepLearning AgeGenderDemo / EmotiW_Demo notebooks -----------------
def test_age_gender_demo_classifier_with_a_binaryproto_mean(tmp_path):
    skimage_transform = pytest.importorskip("skimage.transform")
    deploy, model, weights = _model(tmp_path, batch=10)
    big_mean = np.random.RandomState(3).uniform(60, 160, (3, 10, 10)).astype(np.float32)
    write_blobproto(mean_filename := str(tmp_path / "mean.binaryproto"), big_mean)
    proto_data = open(mean_filename, "rb").read()
    a = caffe.io.caffe_pb2.BlobProto.FromString(proto_data)
    mean = caffe.io.blobproto_to_array(a)[0]
    assert mean.shape == (3, 10, 10) and mean.dtype == np.float64
    age_net = caffe.Classifier(deploy, model, mean=mean, channel_swap=(2, 1, 0),
                               raw_scale=255, image_dims=(10, 10))
    input_image = caffe.io.load_image(_rgb_images(tmp_path, 1, (13, 12))[0])
    prediction = age_net.predict([input_image])
    assert prediction.shape == (1, 3) and 0 <= prediction[0].argmax() < 3
    def resize(im, dims):        # pycaffe's resize_image: skimage on the [0, 1] range
        lo, hi = im.min(), im.max()
        return skimage_transform.resize((im - lo) / (hi - lo), dims, order=1,
                                        mode="constant") * (hi - lo) + lo
    mean8 = resize(mean.transpose(1, 2, 0), (8, 8)).transpose(2, 0, 1)   # set_mean's rule
    batch = _ten_crops(resize(input_image, (10, 10))) * 255 - mean8
    np.testing.assert_allclose(prediction[0], _probs(weights, batch).mean(0), rtol=1e-4)
    assert age_net.params['conv1'][0].data[:49].transpose(0, 2, 3, 1).shape == (4, 1, 1, 3)
    feat = age_net.blobs['conv1'].data[4, :49]          # the centre crop of the last batch
    np.testing.assert_allclose(feat, _conv1(weights, batch[4:5])[0], rtol=1e-4, atol=1e-4)
    centre = age_net.predict([input_image], oversample=False)
    np.testing.assert_allclose(centre.reshape(1, 3), _probs(weights, batch[4:5]), rtol=1e-4)


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
    inputs = np.load(input_file) if input_file.endswith('npy') else \
        [caffe.io.load_image(im_f) for im_f in sorted(glob.glob(input_file + '/*.' + ext))]
    np.save(output_file, classifier.predict(inputs, not center_only))
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
    batch = (np.array(inputs, np.float64)[..., ::-1].transpose(0, 3, 1, 2) * 255 - mean) * 0.5
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), _probs(weights, batch), rtol=1e-5)
    np.save(tmp_path / "in.npy", np.array(inputs))
    _classify_main(deploy, model, str(tmp_path / "in.npy"), str(tmp_path / "ten.npy"),
                   str(tmp_path / "mean.npy"), images_dim='8,8', input_scale=0.5)
    flips = np.concatenate([batch] * 5 + [batch[..., ::-1]] * 5)   # 8x8 crops of 8x8 images
    np.testing.assert_allclose(np.load(tmp_path / "ten.npy"),
                               _probs(weights, flips).reshape(10, 3, 3).mean(0), rtol=1e-5)


# -- BVLC/caffe examples/00-classification.ipynb ----------------------------------------
def test_00_classification_notebook_idioms(tmp_path):
    deploy, model, weights = _model(tmp_path, SHAPED, batch=1)
    net = caffe.Net(deploy, model, caffe.TEST)
    np.save(tmp_path / "mean.npy", np.random.RandomState(5).uniform(100, 130, (3, 16, 16)))
    mu = np.load(tmp_path / "mean.npy").mean(1).mean(1)
    transformer = caffe.io.Transformer({'data': net.blobs['data'].data.shape})
    transformer.set_transpose('data', (2, 0, 1))
    transformer.set_mean('data', mu)
    transformer.set_raw_scale('data', 255)
    transformer.set_channel_swap('data', (2, 1, 0))
    net.blobs['data'].reshape(5, 3, 8, 8)
    image = caffe.io.load_image(_rgb_images(tmp_path, 1)[0])
    net.blobs['data'].data[...] = transformer.preprocess('data', image)   # to every item
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


# -- BVLC/caffe examples/web_demo/app.py (ImagenetClassifier, exifutil) ------------------
def _open_oriented_im(im_path):       # exifutil's, for a file without EXIF orientation
    img = np.asarray(Image.open(im_path)).astype(np.float32) / 255.
    return np.tile(img[:, :, np.newaxis], (1, 1, 3)) if img.ndim == 2 else img[:, :, :3]


def test_web_demo_classifies_an_upload_and_a_url_buffer(tmp_path):
    deploy, model, weights = _model(tmp_path, batch=10)
    np.save(tmp_path / "mean.npy", np.random.RandomState(6).uniform(90, 130, (3, 12, 12)))
    net = caffe.Classifier(deploy, model, image_dims=(10, 10), raw_scale=255.,
                           mean=np.load(str(tmp_path / "mean.npy")).mean(1).mean(1),
                           channel_swap=(2, 1, 0))
    upload = _rgb_images(tmp_path, 1, (10, 10))[0]
    scores = net.predict([_open_oriented_im(upload)], oversample=True).flatten()
    indices = (-scores).argsort()[:5]
    mu = np.load(str(tmp_path / "mean.npy")).mean(1).mean(1)[:, None, None]
    rgb = cv2.imread(upload)[:, :, ::-1] / 255.0
    expected = _probs(weights, _ten_crops(rgb) * 255 - mu).mean(0)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert list(indices) == list(np.argsort(-expected))
    with open(upload, 'rb') as f:                 # classify_url: the bytes in a buffer
        string_buffer = stdio.BytesIO(f.read())
    image = caffe.io.load_image(string_buffer)
    np.testing.assert_allclose(net.predict([image], oversample=True).flatten(), scores,
                               rtol=1e-6)


# -- BVLC/caffe python/detect.py (windows CSV, context padding) -------------------------
IDENTITY = ("name: 'id'\ninput: 'data'\ninput_shape { dim: 2 dim: 3 dim: 10 dim: 10 }\n"
            "layer { name: 'out' type: 'Power' bottom: 'data' top: 'out' }\n")
COORD_COLS = ['ymin', 'xmin', 'ymax', 'xmax']


def _read_windows_csv(path):
    """detect.py's pandas grouping (filename order kept) written with the csv module."""
    rows = list(csv.DictReader(open(path)))
    names = list(dict.fromkeys(r['filename'] for r in rows))
    return [(ix, np.array([[int(r[c]) for c in COORD_COLS] for r in rows
                           if r['filename'] == ix])) for ix in names]


def test_bvlc_detect_py_windows_with_context_pad(tmp_path):
    (tmp_path / "id.prototxt").write_text(IDENTITY)
    files = _rgb_images(tmp_path, 2, (12, 12), seed=7)
    with open(tmp_path / "windows.csv", "w") as f:
        f.write("filename,xmin,ymin,xmax,ymax\n")
        f.write(f"{files[0]},0,0,5,5\n{files[1]},2,1,9,11\n{files[0]},3,3,12,12\n")
    np.save(tmp_path / "mean.npy", np.random.RandomState(8).uniform(90, 130, (3, 10, 10)))
    mean = np.load(str(tmp_path / "mean.npy"))
    if mean.shape[1:] != (1, 1):
        mean = mean.mean(1).mean(1)
    detector = caffe.Detector(str(tmp_path / "id.prototxt"), None, mean=mean,
                              input_scale=None, raw_scale=255.0, channel_swap=[2, 1, 0],
                              context_pad=2)
    images_windows = _read_windows_csv(tmp_path / "windows.csv")
    detections = detector.detect_windows(images_windows)
    assert [d['filename'] for d in detections] == [files[0], files[0], files[1]]
    np.testing.assert_array_equal(np.vstack([d['window'] for d in detections]),
                                  [[0, 0, 5, 5], [3, 3, 12, 12], [1, 2, 11, 9]])
    # window (0, 0, 5, 5), crop 10 with 2 of context: box (-2, -2, 8, 8) scaled by 10/11,
    # so 2 rows/columns of mean padding, then image[0:8, 0:8] unresized
    first = detections[0]['prediction']
    assert first.shape == (3, 10, 10) and np.abs(first[:, :2]).max() < 1e-4
    assert np.abs(first[:, :, :2]).max() < 1e-4
    bgr = cv2.imread(files[0]).astype(np.float64).transpose(2, 0, 1)
    np.testing.assert_allclose(first[:, 2:, 2:], bgr[:, :8, :8] - mean[:, None, None],
                               rtol=1e-5, atol=1e-3)


# -- BVLC/caffe examples/pycaffe/tools.py (SimpleTransformer, CaffeSolver) ---------------
def _simple_preprocess(im, mean=np.array([128, 128, 128], np.float32), scale=1.0):
    """SimpleTransformer.preprocess: BGR, minus the mean, scaled, channels first."""
    im = np.float32(im)[:, :, ::-1]
    im -= mean
    im *= scale
    return im.transpose((2, 0, 1))


def _write_caffe_solver(filepath, trainnet, testnet, **overrides):
    """CaffeSolver's defaults (debug values), every value a string, sorted on write."""
    sp = {'base_lr': '0.001', 'momentum': '0.9', 'test_iter': '1', 'test_interval': '4',
          'display': '1', 'snapshot': '2500', 'snapshot_prefix': '"snapshot"',
          'lr_policy': '"fixed"', 'gamma': '0.1', 'weight_decay': '0.0005',
          'train_net': '"' + trainnet + '"', 'test_net': '"' + testnet + '"',
          'max_iter': '12', 'test_initialization': 'false', 'average_loss': '25',
          'iter_size': '1'}
    sp.update(overrides)
    with open(filepath, 'w') as f:
        f.writelines('%s: %s\n' % (key, value) for key, value in sorted(sp.items()))


REGRESS = """name: 'regress'
layer { name: 'data' type: 'Input' top: 'data' top: 'label'
  input_param { shape { dim: 4 dim: 3 dim: 2 dim: 2 } shape { dim: 4 dim: 2 } } }
layer { name: 'score' type: 'InnerProduct' bottom: 'data' top: 'score' inner_product_param { num_output: 2 } }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'score' bottom: 'label' top: 'loss' }
"""


def test_pycaffe_tools_caffe_solver_then_one_sgd_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("trainnet.prototxt", "valnet.prototxt"):
        (tmp_path / name).write_text(REGRESS)
    pretrained, rng = caffe.Net("trainnet.prototxt", caffe.TEST), np.random.RandomState(9)
    pretrained.params['score'][0].data[...] = rng.uniform(-0.01, 0.01, (2, 12))
    pretrained.save("pretrained.caffemodel")
    _write_caffe_solver("solver.prototxt", "trainnet.prototxt", "valnet.prototxt",
                        base_lr='0.0001')
    solver = caffe.SGDSolver("solver.prototxt")
    solver.net.copy_from("pretrained.caffemodel")
    solver.test_nets[0].share_with(solver.net)
    x = np.array([_simple_preprocess(im) for im in rng.randint(0, 256, (4, 2, 2, 3))])
    t = rng.uniform(-1, 1, (4, 2))
    solver.net.blobs['data'].data[...] = x
    solver.net.blobs['label'].data[...] = t
    w0, b0 = (p.data.astype(np.float64) for p in solver.net.params['score'])
    solver.step(1)
    flat, lr, decay = x.reshape(4, -1).astype(np.float64), 0.0001, 0.0005
    residual = (flat @ w0.T + b0 - t) / 4                 # dLoss/dscore, Loss = sum/(2N)
    np.testing.assert_allclose(solver.net.params['score'][0].data,
                               w0 - lr * (residual.T @ flat + decay * w0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(solver.net.params['score'][1].data,
                               b0 - lr * (residual.sum(0) + decay * b0), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(solver.test_nets[0].params['score'][0].data,
                                  solver.net.params['score'][0].data)     # shared
    loss = 0.5 * ((flat @ w0.T + b0 - t) ** 2).sum() / 4
    np.testing.assert_allclose(float(solver.net.blobs['loss'].data), loss, rtol=1e-5)
    assert solver.iter == 1


# -- Datum helpers and an LMDB read with the lmdb package, as scripts do ----------------
def _write_lmdb(lmdb, path, datums):
    with lmdb.open(str(path), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, datum in enumerate(datums):
            txn.put('{:08}'.format(i).encode('ascii'), datum.SerializeToString())


def test_datums_through_lmdb_raw_float_and_encoded(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    rng = np.random.RandomState(10)
    arrays = [rng.randint(0, 256, (3, 5, 6)).astype(np.uint8) for _ in range(3)]
    floats = rng.uniform(-1, 1, (2, 3, 4))
    _write_lmdb(lmdb, tmp_path / "raw_lmdb", [caffe.io.array_to_datum(arr, np.int64(i + 1))
                                              for i, arr in enumerate(arrays)]
                + [caffe.io.array_to_datum(floats, 7)])
    with lmdb.open(str(tmp_path / "raw_lmdb"), readonly=True) as env, env.begin() as txn:
        for key, value in txn.cursor():
            datum = caffe.proto.caffe_pb2.Datum()
            datum.ParseFromString(value)
            shape = (datum.channels, datum.height, datum.width)
            if datum.float_data:
                np.testing.assert_allclose(np.array(datum.float_data).reshape(shape), floats,
                                           rtol=1e-6)
                assert caffe.io.datum_to_array(datum).dtype == np.float64
                continue
            x = np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
            np.testing.assert_array_equal(x, arrays[int(key)])
            np.testing.assert_array_equal(caffe.io.datum_to_array(datum), x)
            assert datum.label == int(key) + 1
    # encoded records, as scripts build them: the file's bytes, encoded = True
    files = _rgb_images(tmp_path, 2, (5, 6), seed=11)
    _write_lmdb(lmdb, tmp_path / "enc_lmdb", [caffe_pb2.Datum(
        label=i, encoded=True, data=open(f, 'rb').read()) for i, f in enumerate(files)])
    decoded = []
    env = lmdb.open(str(tmp_path / "enc_lmdb"), readonly=True)
    with env.begin() as txn:
        for key, value in txn.cursor():
            datum = caffe_pb2.Datum.FromString(value)
            assert datum.encoded and datum.channels == 0
            bgr = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_COLOR)
            rgb = np.array(Image.open(stdio.BytesIO(datum.data)))
            np.testing.assert_array_equal(bgr[:, :, ::-1], rgb)
            np.testing.assert_array_equal(caffe.io.datum_to_array(datum), bgr.transpose(2, 0, 1))
            decoded.append(bgr.transpose(2, 0, 1))
    # the same database through a Data layer: uint8 BGR C x H x W and the labels
    (tmp_path / "data.prototxt").write_text(
        "layer { name: 'data' type: 'Data' top: 'data' top: 'label' data_param { "
        f"source: '{tmp_path / 'enc_lmdb'}' backend: LMDB batch_size: 2 }} }}\n")
    # the script's env still open (py-lmdb 2.0 on refuses a second environment in one
    # process; Caffe's reader opened one anyway): the net reads through the script's
    net = caffe.Net(str(tmp_path / "data.prototxt"), caffe.TEST)
    net.forward()
    del net
    with env.begin() as txn:                     # still the script's, still open
        assert txn.stat()["entries"] == 2
    env.close()
    net = caffe.Net(str(tmp_path / "data.prototxt"), caffe.TEST)
    net.forward()
    np.testing.assert_array_equal(net.blobs['data'].data, np.array(decoded, np.float32))
    np.testing.assert_array_equal(net.blobs['label'].data, [0, 1])


def test_age_gender_data_preparation_then_the_notebook_mean(tmp_path):
    """GilLevi's create_lmdb_*.sh / make_mean_*.sh: convert_imageset --resize --shuffle,
    compute_image_mean; the LMDB read with the lmdb package, the mean as the notebook reads it."""
    lmdb = pytest.importorskip("lmdb")
    from caffe_compat.commands import compute_image_mean, convert_imageset
    files = _rgb_images(tmp_path, 5, (13, 11), seed=12, ext="jpg")
    (tmp_path / "age_train.txt").write_text(
        "".join(f"{f.rsplit('/', 1)[1]} {i % 2}\n" for i, f in enumerate(files)))
    assert convert_imageset.main(["--resize_height=10", "--resize_width=10", "--shuffle",
                                  str(tmp_path) + "/", str(tmp_path / "age_train.txt"),
                                  str(tmp_path / "age_train_lmdb")]) == 0
    assert compute_image_mean.main([str(tmp_path / "age_train_lmdb"),
                                    str(tmp_path / "mean.binaryproto")]) == 0
    with lmdb.open(str(tmp_path / "age_train_lmdb"), readonly=True) as env, env.begin() as txn:
        records = {k.decode().split('_', 1)[1]: caffe_pb2.Datum.FromString(v)
                   for k, v in txn.cursor()}
    resized = [cv2.resize(cv2.imread(f), (10, 10)).transpose(2, 0, 1) for f in files]
    for i, f in enumerate(files):                 # Caffe's resize: bilinear, BGR planes
        datum = records[f.rsplit('/', 1)[1]]
        np.testing.assert_array_equal(caffe.io.datum_to_array(datum), resized[i])
        assert datum.label == i % 2
    proto_data = open(str(tmp_path / "mean.binaryproto"), "rb").read()
    a = caffe.io.caffe_pb2.BlobProto.FromString(proto_data)
    mean = caffe.io.blobproto_to_array(a)[0]
    np.testing.assert_allclose(mean, np.mean(np.array(resized, np.float64), axis=0), rtol=1e-5)
