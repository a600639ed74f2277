"""Edits of a train_val NetParameter that ``caffe fit`` and ``caffe bundle`` make: point the
data layers at a data set, size the classifier to the class count, derive the deploy net.

The classifier is the layer whose top feeds the SoftmaxWithLoss (or Accuracy) together with
the label blob; the deploy net is the TEST net without its data, loss and accuracy layers, an
Input of the TEST data blob's shape in front and a Softmax ``prob`` behind the classifier.
"""
from __future__ import annotations

from dataclasses import dataclass

from caffe_compat.formats.errors import CaffeCompatError
from caffe_compat.proto import caffe_pb2

IMAGE_DATA_TYPES = ("Data", "ImageData")
CLASSIFIER_TYPES = ("InnerProduct", "Convolution")
SCORE_TYPES = ("SoftmaxWithLoss", "Accuracy")


class NetEditError(CaffeCompatError):
    """A net ``caffe fit`` / ``caffe bundle`` cannot turn into a classifier; names the file."""


@dataclass
class DataLayers:
    """The train_val's image data layers by phase, and the blob names they make
    (``landmark_top``: a Data layer's third top, the records' landmarks, else None)."""
    train: caffe_pb2.LayerParameter | None
    test: caffe_pb2.LayerParameter | None
    data_top: str
    label_top: str
    landmark_top: str | None = None


def _phases(layer) -> set[int]:
    if layer.include:
        return {rule.phase for rule in layer.include if rule.HasField("phase")} or {0, 1}
    excluded = {rule.phase for rule in layer.exclude if rule.HasField("phase")}
    return {0, 1} - excluded


def data_layers(net: caffe_pb2.NetParameter, source: str) -> DataLayers:
    """The Data/ImageData layers of each phase (the TEST one is required)."""
    found = {0: None, 1: None}
    for layer in net.layer:
        if layer.type in IMAGE_DATA_TYPES:
            for phase in _phases(layer):
                found[phase] = layer
    test = found[1]
    if test is None:
        raise NetEditError(f"{source}: no Data or ImageData layer in the TEST phase (a "
                           "classifier bundle needs the TEST preprocessing)")
    if len(test.top) not in (2, 3) or (len(test.top) == 3 and test.type != "Data"):
        raise NetEditError(f"{source}: the TEST data layer '{test.name}' has {len(test.top)} "
                           f"tops ({', '.join(test.top)}); fit and bundle handle classifiers "
                           "fed (data, label), or a Data layer's (data, label, landmarks)")
    return DataLayers(found[0], test, test.top[0], test.top[1],
                      test.top[2] if len(test.top) == 3 else None)


def landmark_outputs(net: caffe_pb2.NetParameter, source: str) -> list[str]:
    """The blobs the net predicts landmarks in (e.g. ``heatmaps``): those a TEST loss layer
    compares with something made from the landmarks top (the landmark loss's other bottom;
    a layer that only reads the image beside the landmarks, as LandmarkHeatmap may, is no
    comparison)."""
    from caffe_compat.engine.net.assemble import filter_net
    top = data_layers(net, source).landmark_top
    if top is None:
        return []
    derived, found = {top}, []
    for layer in filter_net(net, caffe_pb2.NetState(phase=caffe_pb2.TEST), source).layer:
        if derived & set(layer.bottom):
            if layer.type.endswith("Loss") or any(w for w in layer.loss_weight):
                found += [b for b in layer.bottom if b not in derived and b not in found]
            derived |= set(layer.top) - set(layer.bottom)
    return found


def classifier_layer(net: caffe_pb2.NetParameter, label_top: str,
                     source: str) -> caffe_pb2.LayerParameter:
    """The layer producing the scores that the loss (or accuracy) compares with the labels."""
    scores = [layer.bottom[0] for layer in net.layer if layer.type in SCORE_TYPES
              and len(layer.bottom) >= 2 and layer.bottom[1] == label_top]
    if not scores:
        raise NetEditError(f"{source}: no SoftmaxWithLoss or Accuracy layer compares a score "
                           f"blob with '{label_top}'; cannot tell which layer classifies")
    producers = [layer for layer in net.layer if scores[0] in layer.top
                 and layer.type in CLASSIFIER_TYPES]
    if not producers:
        raise NetEditError(f"{source}: '{scores[0]}' (the scores the loss reads) is not made "
                           "by an InnerProduct or Convolution layer")
    return producers[-1]


def num_output(layer: caffe_pb2.LayerParameter) -> int:
    return (layer.inner_product_param.num_output if layer.type == "InnerProduct"
            else layer.convolution_param.num_output)


def set_classes(net: caffe_pb2.NetParameter, classes: int, source: str,
                rename_to: str | None = None) -> str:
    """Size the classifier to ``classes`` outputs; ``rename_to`` renames it (fine-tuning: the
    pretrained weights then leave it at its fillers, and it learns at lr_mult 10/20).
    Returns the classifier's name."""
    layers = data_layers(net, source)
    layer = classifier_layer(net, layers.label_top, source)
    if layer.type == "InnerProduct":
        layer.inner_product_param.num_output = classes
    else:
        layer.convolution_param.num_output = classes
    if rename_to:
        layer.name = rename_to
        for param, mult in zip(layer.param, (10.0, 20.0)):
            param.lr_mult = mult
    return layer.name


def point_data(net: caffe_pb2.NetParameter, sources: dict[int, str], backend: str,
               mean_file: str | None, batch: dict[int, int], source: str) -> None:
    """Read phase p's images from ``sources[p]`` (a Data layer's database) with
    ``batch[p]`` per batch; a mean_file in the model is replaced by ``mean_file`` (a model
    without one keeps its mean_value or no mean)."""
    layers = data_layers(net, source)
    for phase, layer in ((0, layers.train), (1, layers.test)):
        if layer is None:
            raise NetEditError(f"{source}: no Data layer in the TRAIN phase")
        if layer.type != "Data":
            raise NetEditError(f"{source}: layer '{layer.name}' is {layer.type}; caffe fit "
                               "writes databases for Data layers")
        layer.data_param.source = sources[phase]
        layer.data_param.backend = (caffe_pb2.DataParameter.LMDB if backend == "lmdb"
                                    else caffe_pb2.DataParameter.LEVELDB)
        layer.data_param.batch_size = batch[phase]
        transform = layer.transform_param
        if transform.HasField("mean_file"):      # the model's own preprocessing, new data
            if mean_file:
                transform.mean_file = mean_file
            else:
                transform.ClearField("mean_file")


def deploy_net(net: caffe_pb2.NetParameter, input_shape, source: str) -> caffe_pb2.NetParameter:
    """The TEST net as a deploy net: Input → the layers → Softmax 'prob'."""
    from caffe_compat.engine.net.assemble import filter_net
    layers = data_layers(net, source)
    classifier = classifier_layer(net, layers.label_top, source)
    test = filter_net(net, caffe_pb2.NetState(phase=caffe_pb2.TEST), source)
    deploy = caffe_pb2.NetParameter(name=net.name)
    entry = deploy.layer.add(name="input", type="Input", top=[layers.data_top])
    entry.input_param.shape.add(dim=[int(d) for d in input_shape])
    dropped = {layers.label_top, layers.landmark_top} - {None}
    for layer in test.layer:
        if layer.type in IMAGE_DATA_TYPES:      # the Input above makes its data top
            continue
        if dropped & set(layer.bottom):
            dropped |= set(layer.top) - set(layer.bottom)
            continue
        kept = deploy.layer.add()
        kept.CopyFrom(layer)
        for name in ("include", "exclude", "phase"):
            kept.ClearField(name)
    scores = classifier.top[0]
    deploy.layer.add(name="prob", type="Softmax", bottom=[scores], top=["prob"])
    return deploy


def text(net: caffe_pb2.NetParameter, head: str = "") -> str:
    """The prototxt text of ``net`` with ``head`` as a comment on top."""
    from google.protobuf import text_format
    lines = "".join(f"# {line}\n" for line in head.splitlines())
    return lines + text_format.MessageToString(net)


__all__ = ["NetEditError", "DataLayers", "data_layers", "classifier_layer", "num_output",
           "set_classes", "point_data", "deploy_net", "landmark_outputs", "text"]
