"""caffe.io as pycaffe's test_io.py checks it, plus the Transformer's set_mean rule (a
3x256x256 mean for a 227 input), load_image's channel handling and oversample's crops."""
import cv2
import numpy as np
import pytest

import caffe


def test_blobproto_round_trip_and_legacy_shape():
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    blob = caffe.io.array_to_blobproto(arr)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), arr)
    legacy = caffe.proto.caffe_pb2.BlobProto(num=1, channels=2, height=3, width=4)
    legacy.data.extend(range(24))
    assert caffe.io.blobproto_to_array(legacy).shape == (1, 2, 3, 4)


def test_blobprotovector_str_round_trip():
    arrays = [np.random.RandomState(0).rand(2, 3).astype(np.float32), np.ones((4,), np.float32)]
    data = caffe.io.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(data, bytes)
    back = caffe.io.blobprotovector_str_to_arraylist(data)
    # pycaffe up to rc3 spelled it "vecor"; scripts of that time still call that name
    assert caffe.io.arraylist_to_blobprotovecor_str(arrays) == data
    assert [b.shape for b in back] == [(2, 3), (4,)]
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)


def test_datum_round_trip_uint8_and_float():
    u8 = np.random.RandomState(1).randint(0, 255, (3, 4, 5)).astype(np.uint8)
    datum = caffe.io.array_to_datum(u8, label=7)
    assert datum.label == 7 and len(datum.data) == u8.size
    np.testing.assert_array_equal(caffe.io.datum_to_array(datum), u8)
    f = np.random.RandomState(2).rand(1, 2, 2)
    np.testing.assert_allclose(caffe.io.datum_to_array(caffe.io.array_to_datum(f)), f, rtol=1e-6)
    with pytest.raises(ValueError):
        caffe.io.array_to_datum(np.zeros((2, 2)))


def _transformer(shape=(1, 3, 227, 227)):
    return caffe.io.Transformer({"data": shape})


def test_set_mean_resizes_a_larger_pixel_mean_like_pycaffe():
    t = _transformer()
    mean = np.random.RandomState(3).uniform(90, 130, (3, 256, 256)).astype(np.float32)
    t.set_mean("data", mean)
    assert t.mean["data"].shape == (3, 227, 227)
    assert mean.min() - 1e-3 <= t.mean["data"].min() <= t.mean["data"].max() <= mean.max() + 1e-3
    flat = np.full((3, 256, 256), 104.0, np.float32)
    t.set_mean("data", flat)
    assert (t.mean["data"] == 104.0).all()
    t.set_mean("data", np.array([104, 117, 123]))
    assert t.mean["data"].shape == (3, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        t.set_mean("data", np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="invalid"):
        t.set_mean("data", np.zeros((1, 3, 4, 4)))


def test_preprocess_order_and_deprocess_inverse():
    t = _transformer((1, 3, 4, 5))
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    img = np.random.RandomState(4).rand(4, 5, 3).astype(np.float32)
    out = t.preprocess("data", img)
    expected = (img.transpose(2, 0, 1)[[2, 1, 0]] * 255 - np.array([10, 20, 30])[:, None, None]) * 0.5
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(t.deprocess("data", out), img, rtol=1e-5, atol=1e-6)


def test_load_image_channels(tmp_path):
    rgb = np.random.RandomState(5).randint(0, 255, (6, 7, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), rgb[:, :, ::-1])
    img = caffe.io.load_image(str(tmp_path / "c.png"))
    assert img.shape == (6, 7, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img, rgb / 255.0, atol=1e-6)
    gray = caffe.io.load_image(str(tmp_path / "c.png"), color=False)
    np.testing.assert_allclose(gray[:, :, 0], (rgb / 255.0) @ [0.2125, 0.7154, 0.0721], atol=1e-5)
    cv2.imwrite(str(tmp_path / "g.png"), rgb[:, :, 0])
    tiled = caffe.io.load_image(str(tmp_path / "g.png"))
    assert tiled.shape == (6, 7, 3) and (tiled[:, :, 0] == tiled[:, :, 2]).all()
    rgba = np.dstack([rgb[:, :, ::-1], np.full((6, 7), 9, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "a.png")), rgb / 255.0,
                               atol=1e-6)


def test_resize_image_shapes_and_constant():
    im = np.random.RandomState(6).rand(10, 8, 3).astype(np.float32)
    assert caffe.io.resize_image(im, (5, 4)).shape == (5, 4, 3)
    assert caffe.io.resize_image(np.random.rand(6, 6, 7), (3, 3)).shape == (3, 3, 7)
    const = caffe.io.resize_image(np.full((4, 4, 1), 0.25, np.float32), (9, 9))
    assert const.shape == (9, 9, 1) and (const == 0.25).all()


def test_oversample_crops_and_mirrors():
    im = np.arange(2 * 9 * 9 * 1, dtype=np.float32).reshape(2, 9, 9, 1)
    crops = caffe.io.oversample(list(im), (6, 6))
    assert crops.shape == (20, 6, 6, 1)
    a = im[0]
    expected = [a[:6, :6], a[:6, 3:], a[3:, :6], a[3:, 3:], a[1:7, 1:7]]   # int(4.5 - 3) = 1
    for k, e in enumerate(expected):
        np.testing.assert_array_equal(crops[k], e)
        np.testing.assert_array_equal(crops[5 + k], e[:, ::-1])
    np.testing.assert_array_equal(crops[10], im[1][:6, :6])


# -- pycaffe's resize_image is skimage's resize (anti-aliased when shrinking) ------------
@pytest.mark.parametrize("shape, new_dims, order", [
    ((360, 480, 3), (32, 32), 1),      # a photo shrunk to a CIFAR input: the anti-aliased case
    ((37, 23, 1), (64, 50), 1),        # enlarging: no smoothing
    ((40, 30, 3), (17, 45), 0),        # shrink one axis, grow the other; nearest
    ((40, 30, 3), (13, 11), 3),        # cubic spline
])
def test_resize_image_matches_skimage_as_pycaffe_calls_it(shape, new_dims, order):
    transform = pytest.importorskip("skimage.transform")
    im = np.random.default_rng(0).uniform(-20, 300, shape).astype(np.float32)
    lo, hi = im.min(), im.max()          # pycaffe's own steps around skimage.resize
    expected = transform.resize((im - lo) / (hi - lo), new_dims, order=order,
                                mode="constant") * (hi - lo) + lo
    got = caffe.io.resize_image(im, new_dims, interp_order=order)
    assert got.dtype == np.float32 and got.shape == new_dims + (shape[2],)
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-5, atol=1e-4)


def test_shrinking_averages_instead_of_sampling():
    """Guard for the guard: a 1-pixel checkerboard shrunk 8x is grey, not a sampled pattern."""
    board = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)[..., None]
    small = caffe.io.resize_image(board, (8, 8))
    assert np.abs(small[2:-2, 2:-2] - 0.5).max() < 0.02


def test_resize_image_other_channel_counts_use_scipy_zoom():
    ndimage = pytest.importorskip("scipy.ndimage")
    im = np.random.default_rng(1).random((6, 8, 7)).astype(np.float32)
    np.testing.assert_allclose(caffe.io.resize_image(im, (3, 4)),
                               ndimage.zoom(im, (0.5, 0.5, 1), order=1), rtol=1e-6)


def test_load_image_reads_file_objects_like_paths(tmp_path):
    """open_nsfw hands load_image a BytesIO of a JPEG it re-encoded in memory."""
    import io as stdio
    rgb = np.random.default_rng(2).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    ok, jpeg = cv2.imencode(".jpg", rgb)
    assert ok
    (tmp_path / "x.jpg").write_bytes(jpeg.tobytes())
    from_path = caffe.io.load_image(str(tmp_path / "x.jpg"))
    from_buffer = caffe.io.load_image(stdio.BytesIO(jpeg.tobytes()))
    with open(tmp_path / "x.jpg", "rb") as handle:
        from_file = caffe.io.load_image(handle, color=False)
    np.testing.assert_array_equal(from_buffer, from_path)
    assert from_file.shape == (9, 7, 1)
    with pytest.raises(IOError, match="not an image"):
        caffe.io.load_image(stdio.BytesIO(b"not a picture"))


# -- dtypes and rounding as BVLC's python/caffe/io.py produces them ---------------------
def test_blobproto_and_float_datum_arrays_are_float64_like_pycaffe():
    """pycaffe builds both with np.array(<repeated float field>): float64, so a mean saved
    from a binaryproto is a float64 .npy there and its .mean(1).mean(1) accumulates in
    float64."""
    blob = caffe.io.array_to_blobproto(np.arange(6, dtype=np.float32).reshape(1, 2, 3))
    assert caffe.io.blobproto_to_array(blob).dtype == np.float64
    legacy = caffe.proto.caffe_pb2.BlobProto(num=1, channels=1, height=1, width=2)
    legacy.diff.extend([0.5, 0.25])
    assert caffe.io.blobproto_to_array(legacy, return_diff=True).dtype == np.float64
    vec = caffe.io.arraylist_to_blobprotovector_str([np.ones((2, 2), np.float32)])
    assert caffe.io.blobprotovector_str_to_arraylist(vec)[0].dtype == np.float64
    datum = caffe.io.array_to_datum(np.full((1, 2, 2), 0.1, np.float32))
    assert caffe.io.datum_to_array(datum).dtype == np.float64
    u8 = caffe.io.array_to_datum(np.zeros((1, 2, 2), np.uint8))
    assert caffe.io.datum_to_array(u8).dtype == np.uint8


def test_preprocess_subtracts_a_float64_mean_with_pycaffe_rounding():
    """pycaffe subtracts in place: float32 data minus the mean as given (float64 from
    ``mu = np.load(mean.npy).mean(1).mean(1)``), rounded once to float32 -- not the mean
    first rounded to float32."""
    t = _transformer((1, 3, 6, 5))
    t.set_transpose("data", (2, 0, 1))
    t.set_raw_scale("data", 255.0)
    mu = np.array([104.00698793, 116.66876762, 122.67891434])
    t.set_mean("data", mu)
    t.set_input_scale("data", 0.017)
    img = np.random.default_rng(7).random((6, 5, 3)).astype(np.float32)
    expected = img.transpose(2, 0, 1).copy()
    expected *= 255.0
    expected -= mu[:, None, None]
    expected *= 0.017
    got = t.preprocess("data", img)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(img, np.random.default_rng(7).random((6, 5, 3)).astype(np.float32))


def test_load_image_as_grey_rounds_like_skimage(tmp_path):
    """color=False is skimage's imread(as_gray=True): luminance in float64, one rounding."""
    skio = pytest.importorskip("skimage.io")
    import skimage
    rgb = np.random.default_rng(8).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), rgb[:, :, ::-1])
    expected = skimage.img_as_float(skio.imread(str(tmp_path / "c.png"), as_gray=True))
    got = caffe.io.load_image(str(tmp_path / "c.png"), color=False)
    np.testing.assert_array_equal(got[:, :, 0], expected.astype(np.float32))


def test_load_image_keeps_float_files_values(tmp_path):
    """skimage's img_as_float leaves floating-point pixels as they are (a float TIFF of
    depths or HDR values is not divided by 255); the grey mix applies to them unscaled, in
    float64 as the skimage of pycaffe's time computed it."""
    skio = pytest.importorskip("skimage.io")
    bgr = np.random.default_rng(9).uniform(0, 3, (5, 6, 3)).astype(np.float32)
    assert cv2.imwrite(str(tmp_path / "f.tif"), bgr)
    pixels = skio.imread(str(tmp_path / "f.tif"))
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(caffe.io.load_image(str(tmp_path / "f.tif")), pixels)
    grey = pixels.astype(np.float64) @ [0.2125, 0.7154, 0.0721]
    np.testing.assert_array_equal(caffe.io.load_image(str(tmp_path / "f.tif"), color=False),
                                  grey.astype(np.float32)[:, :, None])
