"""SegNet-Tutorial's Scripts/compute_bn_statistics.py in its style (our own code, written after
reading what it calls): a BN-statistics net made from a train net through caffe_pb2 and
text_format, forwards over the training set accumulating the BN layers' batch mean/variance
tops, the population statistics folded into the BN blobs, and an inference net message; and
a small training set of images and label images for it."""
import cv2
import numpy as np
from google.protobuf import text_format

import caffe
from caffe.proto import caffe_pb2


def make_testable(train_model_path):
    train_net = caffe_pb2.NetParameter()
    text_format.Merge(open(train_model_path).read(), train_net)
    for layer in train_net.layer:
        if layer.type == "BN" and len(layer.top) == 1:
            layer.top.append(layer.top[0] + "-mean")
            layer.top.append(layer.top[0] + "-var")
    if train_net.layer[1].name == "data" and train_net.layer[1].include:
        train_net.layer.remove(train_net.layer[1])
        if train_net.layer[0].include:
            train_net.layer[0].include.remove(train_net.layer[0].include[0])
    return train_net


def make_test_files(testable_net_path, train_weights_path, num_iterations, in_h, in_w):
    msg = caffe_pb2.NetParameter()
    text_format.Merge(open(testable_net_path).read(), msg)
    bn = [(l.name, l.top[0], l.top[1], l.top[2]) for l in msg.layer if l.type == "BN"]
    net = caffe.Net(testable_net_path, train_weights_path, caffe.TEST)
    res = net.forward()
    avg = {top: np.squeeze(res[top]).copy() for _, _, m, v in bn for top in (m, v)}
    for _ in range(1, num_iterations):
        res = net.forward()
        for top in avg:
            avg[top] += np.squeeze(res[top])
    for layer, blob, mean, var in bn:
        m = np.prod(net.blobs[blob].data.shape) / np.prod(avg[var].shape)
        ex, varx = avg[mean] / num_iterations, avg[var] / num_iterations * (m / (m - 1))
        gamma, beta = (np.squeeze(net.params[layer][i].data) for i in (0, 1))
        new_gamma = gamma / np.sqrt(varx + 1e-9)
        new_beta = beta - (gamma * ex / np.sqrt(varx + 1e-9))
        net.params[layer][0].data[...] = new_gamma.reshape(net.params[layer][0].data.shape)
        net.params[layer][1].data[...] = new_beta.reshape(net.params[layer][1].data.shape)
    for data_layer in [l for l in msg.layer if l.type.endswith("Data")]:
        msg.layer.remove(data_layer)
    msg.input.append("data")
    msg.input_dim.extend([1, 3, in_h, in_w])
    for l in msg.layer:
        if l.type == "BN":
            for dead in l.top[1:]:
                l.top.remove(dead)
            l.bn_param.bn_mode = caffe_pb2.BNParameter.INFERENCE
    dead_outputs = [l for l in msg.layer if l.type in ["SoftmaxWithLoss", "Accuracy"]]
    out_bottom = dead_outputs[0].bottom[0]
    for dead in dead_outputs:
        msg.layer.remove(dead)
    msg.layer.add(name="prob", type="Softmax", bottom=[out_bottom], top=["prob"])
    return net, msg


def segnet_images(folder, n: int, seed=0) -> list[tuple[str, str]]:
    """``n`` 6x8 BGR images and label images (classes 0-2) as PNGs, and a list of them."""
    rng, pairs = np.random.RandomState(seed), []
    for i in range(n):
        pairs.append((str(folder / f"im{i}.png"), str(folder / f"lab{i}.png")))
        cv2.imwrite(pairs[-1][0], rng.randint(0, 256, (6, 8, 3)).astype(np.uint8))
        cv2.imwrite(pairs[-1][1], rng.randint(0, 3, (6, 8)).astype(np.uint8))
    (folder / "train.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    return pairs
