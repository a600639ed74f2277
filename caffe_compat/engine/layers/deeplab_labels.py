"""DeepLab v2's image-label layers for weakly supervised training (deeplab-public-ver2
``unique_label_layer.cpp``, ``bias_channel_layer.cpp``): the labels an image holds, and fixed
biases on those labels' score channels. Both read blobs as Caffe's legacy N×C×H×W.
"""
from __future__ import annotations

from typing import Sequence

import torch

from caffe_compat.engine.layers.base import Layer, Shape, legacy_shape, register
from caffe_compat.proto import caffe_pb2


def _legacy(layer: Layer, shape: Shape, what: str) -> tuple[int, int, int, int]:
    try:
        return legacy_shape(tuple(shape))
    except ValueError:
        raise layer.error(f"{what} has {len(shape)} axes; at most 4 (N, C, H, W)") from None


@register
class UniqueLabel(Layer):
    """Top ``[N, max_labels, 1, 1]``: per image the distinct values of the label map
    ``[N, 1, H, W]`` that are not an ``ignore_label``, together with every ``force_label``,
    ascending, then -1s. More distinct values than ``max_labels`` is an error (as the fork's
    CHECK). No gradient."""

    type = "UniqueLabel"
    family = "common"
    origin = "DeepLab v2"
    no_grad_bottoms = (0,)
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.unique_label_param
        self.force = torch.tensor(sorted(set(p.force_label)), dtype=torch.float64)
        if not p.HasField("max_labels") or p.max_labels <= len(self.force):
            raise self.error(f"unique_label_param.max_labels must exceed the {len(self.force)} "
                             "force_label value(s): at least one image label has to fit")
        self.max_labels = p.max_labels
        self.ignore = torch.tensor(sorted(set(p.ignore_label)), dtype=torch.float64)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        n, c, _, _ = _legacy(self, bottom_shapes[0], "the label blob")
        if c != 1:
            raise self.error(f"the label blob {list(bottom_shapes[0])} must have one channel")
        return [(n, self.max_labels, 1, 1)]

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(label.shape)])
        top = torch.full((label.shape[0], self.max_labels), -1.0, dtype=torch.float64)
        for n, values in enumerate(label.detach().reshape(label.shape[0], -1).cpu().double()):
            kept = values[~torch.isin(values, self.ignore)]
            found = torch.unique(torch.cat([kept, self.force]))       # sorted ascending
            if len(found) > self.max_labels:
                raise self.error(f"image {n} holds {len(found)} distinct labels, more than "
                                 f"max_labels ({self.max_labels})")
            top[n, :len(found)] = found
        return top.to(label.dtype).to(label.device).view(-1, self.max_labels, 1, 1)


@register
class BiasChannel(Layer):
    """``scores + bias``, the bias from the labels of bottom 1 (a constant for the gradient,
    which passes unchanged to the scores, as the fork's backward).

    IMAGE labels ``[N, L, 1, 1]`` (UniqueLabel's top): every listed label in [0, C) not
    ignored (-1 never counts) adds ``bg_bias`` (label 0) or ``fg_bias`` to its whole channel,
    once per listing. PIXEL labels ``[N, 1, H, W]``: a position's label adds ``fg_bias`` to its
    channel there; with a background label (``background_label`` or ``bg_bias`` set) every
    labelled position adds ``bg_bias`` to the background channel and the background label
    itself no ``fg_bias``. Labels are truncated to int; one outside [0, C) that is not ignored
    is an error, as the fork's LOG(FATAL).
    """

    type = "BiasChannel"
    family = "common"
    origin = "DeepLab v2"
    num_bottoms = (2, 2)
    no_grad_bottoms = (1,)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.bias_channel_param
        if p.bg_bias < 0 or p.fg_bias < 0:
            raise self.error(f"bg_bias ({p.bg_bias:g}) and fg_bias ({p.fg_bias:g}) must not be "
                             "negative")
        self.pixel = p.label_type == caffe_pb2.BiasChannelParameter.PIXEL
        self.bg_bias, self.fg_bias = float(p.bg_bias), float(p.fg_bias)
        self.background = (p.background_label if p.HasField("background_label")
                           or p.HasField("bg_bias") else None)
        self.ignore = torch.tensor(sorted(set(p.ignore_label) | {-1}), dtype=torch.long)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        if len(bottom_shapes[0]) < 2:
            raise self.error(f"the scores {list(bottom_shapes[0])} need a channel axis")
        score = _legacy(self, bottom_shapes[0], "the score blob")
        label = _legacy(self, bottom_shapes[1], "the label blob")
        expected = (score[0], 1) + score[2:] if self.pixel else (score[0], label[1], 1, 1)
        if label != expected or not label[1]:
            kind = "N×1×H×W (label_type PIXEL)" if self.pixel else "N×L×1×1 (label_type IMAGE)"
            raise self.error(f"labels {list(bottom_shapes[1])} must be {kind} for scores "
                             f"{list(bottom_shapes[0])}")
        if self.pixel and self.background is not None and not 0 <= self.background < score[1]:
            raise self.error(f"background_label {self.background} is not a channel of "
                             f"{score[1]}")
        return [tuple(bottom_shapes[0])]

    def forward(self, score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        n, c, _, _ = _legacy(self, tuple(score.shape), "the score blob")
        lab = label.detach().reshape(n, -1).cpu().long()              # static_cast<int>
        keep = ~torch.isin(lab, self.ignore)
        bad = keep & ((lab < 0) | (lab >= c))
        if bool(bad.any()):
            raise self.error(f"unexpected label {int(lab[bad][0])}; labels must be in [0, {c}) "
                             "or an ignore_label")
        if self.pixel:
            bias = self._pixel_bias(lab, keep, c).reshape(score.shape)
        else:
            bias = self._image_bias(lab, keep, c).view((n, c) + (1,) * (score.dim() - 2))
        return score + bias.to(device=score.device, dtype=score.dtype)

    def _image_bias(self, lab: torch.Tensor, keep: torch.Tensor, c: int) -> torch.Tensor:
        """(N, C): bg_bias for each listing of label 0, fg_bias for each other label."""
        per_label = torch.where(lab == 0, self.bg_bias, self.fg_bias) * keep
        return torch.zeros(lab.shape[0], c, dtype=torch.float64).scatter_add_(
            1, lab.clamp(0, c - 1), per_label.double())

    def _pixel_bias(self, lab: torch.Tensor, keep: torch.Tensor, c: int) -> torch.Tensor:
        """(N, C, H·W): fg_bias at each labelled position's channel, bg_bias at the background
        channel of every labelled position (with a background label)."""
        bias = torch.zeros(lab.shape[0], c, lab.shape[1], dtype=torch.float64)
        foreground = keep if self.background is None else keep & (lab != self.background)
        bias.scatter_add_(1, lab.clamp(0, c - 1).unsqueeze(1),
                          (foreground * self.fg_bias).double().unsqueeze(1))
        if self.background is not None:
            bias[:, self.background] += keep.double() * self.bg_bias
        return bias


@register
class AdaptiveBiasChannel(Layer):
    """Scores with each present label's channel raised until it wins a set share of the
    positions (deeplab-public-ver2 ``adaptive_bias_channel_layer.cpp``, weakly supervised
    training from image labels ``[N, L, 1, 1]``, -1 for none).

    Per image, with the present labels (in [0, C), kept with repeats; none: unchanged):
    ``suppress_others`` lowers every absent channel that beats the lowest present one to that
    value minus ``margin_others``; then ``num_iter`` times, background (0) first and the others
    in a fresh random order, a label's channel gets the ``floor(portion·H·W)``-th smallest
    (0-based) of ``max present - channel`` added (``bg_portion`` for 0, ``fg_portion`` else),
    and the pointwise maximum follows. Finally all channels shift so that the spatial mean of
    that maximum is what it was before. No gradient (the fork's backward is empty)."""

    type = "AdaptiveBiasChannel"
    family = "common"
    origin = "DeepLab v2"
    num_bottoms = (2, 2)
    no_grad_bottoms = (0, 1)
    draws_random = True
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.adaptive_bias_channel_param
        if p.num_iter <= 0:
            raise self.error(f"adaptive_bias_channel_param.num_iter ({p.num_iter}) must be "
                             "positive")
        if not p.margin_others >= 0:
            raise self.error(f"adaptive_bias_channel_param.margin_others ({p.margin_others:g}) "
                             "must not be negative")
        for name in ("bg_portion", "fg_portion"):
            if not 0 <= getattr(p, name) < 1:
                raise self.error(f"adaptive_bias_channel_param.{name} ({getattr(p, name):g}) "
                                 "must be in [0, 1) (at 1 the fork reads past its buffer)")
        self.p = p
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        n, c, _, _ = _legacy(self, bottom_shapes[0], "the score blob")
        label = _legacy(self, bottom_shapes[1], "the label blob")
        if c < 2 or label[0] != n or label[1] < 1 or label[2:] != (1, 1):
            raise self.error(f"scores {list(bottom_shapes[0])} need at least 2 channels and "
                             f"labels {list(bottom_shapes[1])} must be [{n}, L >= 1, 1, 1]")
        return [tuple(bottom_shapes[0])]

    def forward(self, score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(score.shape), tuple(label.shape)])
        n, c, _, _ = _legacy(self, tuple(score.shape), "the score blob")
        top = score.detach().clone().reshape(n, c, -1)
        for i, row in enumerate(label.detach().reshape(n, -1).cpu().tolist()):
            labels = sorted(int(v) for v in row if int(v) != -1)   # static_cast<int>
            bad = [v for v in labels if not 0 <= v < c]
            if bad:
                raise self.error(f"image {i}: unexpected label {bad[0]}; labels must be in "
                                 f"[0, {c}) or -1")
            if labels:
                self._adapt(top[i], labels)
        return top.reshape(score.shape)

    def _adapt(self, top: torch.Tensor, labels: list[int]) -> None:
        """One image's (C, H·W) scores, in place."""
        present = torch.tensor(sorted(set(labels)), device=top.device)
        if self.p.suppress_others:
            lowest = top[present].min(0).values
            absent = torch.ones(top.shape[0], dtype=torch.bool, device=top.device)
            absent[present] = False
            clip = (top > lowest) & absent[:, None]
            top[clip] = (lowest - self.p.margin_others).expand_as(top)[clip]
        highest = top[present].max(0).values
        before = highest.double().mean()
        start = 1 if labels[0] == 0 else 0                      # background stays first
        spatial = top.shape[1]
        for _ in range(self.p.num_iter):
            rest = labels[start:]
            labels[start:] = [rest[j] for j in torch.randperm(len(rest)).tolist()]
            for lab in labels:
                portion = self.p.bg_portion if lab == 0 else self.p.fg_portion
                nth = int(torch.tensor(portion, dtype=torch.float32) * spatial)
                gap = torch.kthvalue((highest - top[lab]).cpu(), nth + 1).values
                top[lab] += gap.to(top.device)
                highest = torch.maximum(highest, top[lab])
        top += (before - highest.double().mean()).to(top.dtype)
