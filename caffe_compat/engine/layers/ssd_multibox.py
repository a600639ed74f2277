"""SSD's MultiBoxLoss (weiliu89/caffe branch ``ssd``, ``multibox_loss_layer.cpp``).

Bottoms: loc ``[N, P·L·4]`` (L = 1 with ``share_location``, else ``num_classes``), conf
``[N, P·C]`` (scores before the softmax), priors ``[1, 2, P·4]`` (PriorBox/Concat), labels
``[1, 1, G, 8]`` rows ``[item_id, label, instance_id, xmin, ymin, xmax, ymax, difficult]``
(``item_id`` -1: padding). Top: the scalar loss.

Per image, priors are matched to the ground truth (``ssd_matching.match_boxes``; with
``use_prior_for_matching: false`` the decoded predictions are matched instead). Matched
priors are positives: their predictions regress the encoded boxes (``code_type``, SMOOTH_L1
or L2 = half the squared error, summed). The confidence loss (softmax cross-entropy or
per-class logistic, summed) covers the positives and the mined negatives (MAX_NEGATIVE: the
``neg_pos_ratio`` × positives unmatched priors of highest background loss whose best overlap
is below ``neg_overlap``; HARD_EXAMPLE: the ``sample_size`` priors of highest loss, box loss
included, positives outside them dropping out), or every prior with ``mining_type: NONE``.
The loss is ``(loc_weight · loc + conf) / normalizer``, the normalizer from
``loss_param.normalization`` (VALID: the number of matches) floored at 1.

The gradient is SSD's: matching and mining are constants of the forward pass. Two places
where SSD's backward is not the derivative of its forward are kept: with
``encode_variance_in_target`` the predictions are divided by the variances in the loss but
their gradient is not, and with ``bp_inside`` a coordinate whose box leaves the image gets
no gradient. A loss term whose ``propagate_down`` is false is left out of the value, as SSD
does. With LOGISTIC and ``mining_type: NONE`` SSD advances its target pointer by P, not P·C,
per image, so image ``i``'s one-hot targets land at flat index ``i·P + j·C + label``; that is
reproduced (for one image it is the plain layout). With ``nms_param`` (``nms_threshold`` >
0) either mining first suppresses candidates by loss (``ssd_matching.hardest_after_nms``); an
unset ``nms_param.top_k`` is 0 there, as in SSD, and then mines nothing.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.loss import FLT_MIN, _clamped_log, _normalizer, refuse_pre_fixed
from caffe_compat.engine.layers.ssd import SSD, _legacy_chw
from caffe_compat.engine.layers.ssd_detection import F32, decode_boxes
from caffe_compat.engine.layers import ssd_matching as M
from caffe_compat.proto import caffe_pb2

_P = caffe_pb2.MultiBoxLossParameter
_Loss = caffe_pb2.LossParameter


class _DivideKeepGrad(torch.autograd.Function):
    """``x / v`` whose backward passes the gradient through unscaled, as SSD's does for
    predictions divided by their variances (``encode_variance_in_target``)."""

    @staticmethod
    def forward(ctx, x, v):
        return x / v

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@register
class MultiBoxLoss(Layer):
    """SSD's detection training loss: box regression on matched priors plus confidence
    loss on positives and mined negatives; gradients to loc and conf only."""

    type = "MultiBoxLoss"
    family = "ssd"
    origin = SSD
    num_bottoms = (4, 4)
    num_tops = (1, 1)
    is_loss = True
    auto_top = True
    no_grad_bottoms = (2, 3)
    full_precision = True
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.multibox_loss_param
        self.p = p
        if not p.HasField("num_classes") or p.num_classes < 1:
            raise self.error("multibox_loss_param needs num_classes (at least 1)")
        self.num_classes = int(p.num_classes)
        self.loc_classes = 1 if p.share_location else self.num_classes
        self.background = int(p.background_label_id)
        self.mining = int(p.mining_type)
        self._check_options(p)
        self.normalization = self._normalization(param.loss_param)
        self.terms = self._terms(list(param.propagate_down))
        self.top_shapes(bottom_shapes)

    # -- set-up --------------------------------------------------------------------------
    def _check_options(self, p) -> None:
        self._check_mining(p)
        if p.loc_loss_type not in (_P.L2, _P.SMOOTH_L1):
            raise self.error(f"unknown loc_loss_type {p.loc_loss_type} (known: L2, SMOOTH_L1)")
        if p.conf_loss_type not in (_P.SOFTMAX, _P.LOGISTIC):
            raise self.error(f"unknown conf_loss_type {p.conf_loss_type} "
                             "(known: SOFTMAX, LOGISTIC)")
        # SSD checks this for the softmax loss and, when mining, for either loss.
        if (p.conf_loss_type == _P.SOFTMAX or self.mining != _P.NONE) \
                and not self.background < self.num_classes:
            raise self.error(f"background_label_id {self.background} must be below "
                             f"num_classes {self.num_classes}")
        if p.map_object_to_agnostic and self.num_classes != 2:
            raise self.error("map_object_to_agnostic needs num_classes: 2 (background and "
                             "object)")
        if p.code_type not in (M.CORNER, M.CENTER_SIZE, M.CORNER_SIZE):
            raise self.error(f"unknown code_type {p.code_type}")
        if p.match_type not in (_P.BIPARTITE, _P.PER_PREDICTION):
            raise self.error(f"unknown match_type {p.match_type}")

    def _check_mining(self, p) -> None:
        if p.HasField("do_neg_mining") and p.do_neg_mining != (self.mining != _P.NONE):
            raise self.error(f"do_neg_mining: {str(p.do_neg_mining).lower()} contradicts "
                             f"mining_type {_P.MiningType.Name(self.mining)} (SSD checks they "
                             "agree; do_neg_mining is deprecated: set mining_type only)")
        if self.mining != _P.NONE and not p.share_location:
            raise self.error("negative mining needs share_location: true (as in SSD); "
                             "use mining_type: NONE with per-class locations")
        if self.mining == _P.HARD_EXAMPLE and p.sample_size <= 0:
            raise self.error("mining_type HARD_EXAMPLE needs sample_size > 0")
        if self.mining not in (_P.NONE, _P.MAX_NEGATIVE, _P.HARD_EXAMPLE):
            raise self.error(f"unknown mining_type {self.mining}")

    def _normalization(self, lp) -> int:
        """``normalization`` unless only the legacy ``normalize`` is set (SSD's rule)."""
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            return _Loss.VALID if lp.normalize else _Loss.BATCH_SIZE
        return refuse_pre_fixed(self, int(lp.normalization))

    def _terms(self, propagate_down: list[bool]) -> tuple[bool, bool]:
        """Which of (loc, conf) enter the loss: SSD adds a term only where its bottom
        propagates down (default: loc and conf yes, priors and labels no)."""
        if not propagate_down:
            return True, True
        if len(propagate_down) == 4 and (propagate_down[2] or propagate_down[3]):
            raise self.error("MultiBoxLoss cannot propagate down to the priors or the labels "
                             "(bottoms 2 and 3): set their propagate_down to false")
        return bool(propagate_down[0]), bool(len(propagate_down) > 1 and propagate_down[1])

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        loc, conf, prior, label = (tuple(s) for s in bottom_shapes)
        priors = _legacy_chw(prior)[1] // 4
        need = {"loc": priors * self.loc_classes * 4, "conf": priors * self.num_classes}
        for name, shape in (("loc", loc), ("conf", conf)):
            have = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            if have != need[name]:
                raise self.error(f"{priors} priors need {need[name]} {name} values per image, "
                                 f"bottom {name} has {have} ({list(shape)})")
        if loc[0] != conf[0]:
            raise self.error(f"loc ({loc[0]}) and conf ({conf[0]}) batch sizes differ")
        if int(np.prod(label)) != _legacy_chw(label)[1] * 8:
            raise self.error(f"the label bottom must be [1, 1, G, 8] rows, got {list(label)}")
        return [()]

    # -- forward ---------------------------------------------------------------------------
    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor,
                label: torch.Tensor) -> torch.Tensor:
        shapes = [tuple(t.shape) for t in (loc, conf, prior, label)]
        self.top_shapes(shapes)
        n, priors = loc.shape[0], _legacy_chw(shapes[2])[1] // 4
        loc4 = loc.reshape(n, priors, self.loc_classes, 4)
        scores = conf.reshape(n, priors, self.num_classes)
        host = _host(prior).reshape(2, priors, 4)
        try:
            gt = M.read_ground_truth(_host(label), self.background, self.p.use_difficult_gt)
            matches = self._match(gt, _host(loc4), host[0], host[1])
            selected = self._select(gt, matches, _host(scores), loc4, host)
            loc_sum, count = self._loc_loss(loc4, gt, selected["match"], host)
        except M.MatchingError as e:
            raise self.error(str(e)) from None
        conf_sum = self._conf_loss(scores, gt, selected)
        normalizer = _normalizer(self.normalization, n, priors, count)
        total = loc.new_zeros(())
        if self.terms[0]:
            total = total + float(self.p.loc_weight) * loc_sum / normalizer
        if self.terms[1]:
            total = total + conf_sum / normalizer
        return total

    def _match(self, gt: dict, loc4: np.ndarray, priors: np.ndarray,
               variances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[N, L, P]`` gt indices (-1 none, -2 ignored) and best overlaps (for mining)."""
        n, count = loc4.shape[0], priors.shape[0]
        match = np.full((n, self.loc_classes, count), -1, dtype=np.int64)
        overlap = np.zeros((n, self.loc_classes, count), dtype=F32)
        per_class, by_prior = not self.p.share_location, self.p.use_prior_for_matching
        for i, truth in gt.items():
            if not 0 <= i < n:
                continue
            # Matching priors does not depend on the class: done once, then split by label.
            once = self._match_one(truth, priors, np.arange(len(truth.labels))) \
                if by_prior else None
            for c in range(self.loc_classes):
                if per_class and c == self.background:
                    continue
                if once is None:
                    keep = truth.labels == c if per_class else np.ones(len(truth.labels), bool)
                    boxes = decode_boxes(loc4[i, :, c], priors, variances, self.p.code_type,
                                         self.p.encode_variance_in_target)
                    match[i, c], overlap[i, c] = self._match_one(truth, boxes,
                                                                 np.flatnonzero(keep))
                    continue
                found, overlap[i, c] = once
                if per_class:
                    found = np.where((found > -1) & (truth.labels[np.maximum(found, 0)] != c),
                                     -1, found)
                match[i, c] = found
        return match, overlap

    def _match_one(self, truth, candidates: np.ndarray, index: np.ndarray):
        """Match candidate boxes to the ground truth ``index`` selects; indices into all of
        the image's ground truth."""
        p = self.p
        found, overlap = M.match_boxes(candidates, truth.boxes[index], p.match_type,
                                       p.overlap_threshold, p.ignore_cross_boundary_bbox)
        if not len(index):   # no box of this class: nothing matched, nothing ignored
            return found, overlap
        return np.where(found > -1, index[np.maximum(found, 0)], found), overlap

    def _select(self, gt: dict, matches, scores: np.ndarray, loc4: torch.Tensor,
                host: np.ndarray) -> dict:
        """Positives (the match array after mining) and each image's mined negatives."""
        match, overlap = matches
        negatives = [np.zeros(0, dtype=np.int64) for _ in range(match.shape[0])]
        if self.mining == _P.NONE:
            return {"match": match, "negatives": negatives}
        losses = self._mining_losses(gt, match, scores, loc4, host)
        hard = self.mining == _P.HARD_EXAMPLE
        for i in gt:
            if not 0 <= i < match.shape[0]:
                continue
            found = match[i, 0]
            candidates = M.mining_candidates(found, overlap[i, 0], hard, self.p.neg_overlap)
            count = min(self.p.sample_size if hard
                        else M.negatives_wanted(found, self.p.neg_pos_ratio), len(candidates))
            chosen = (self._after_nms(candidates, losses[i], count, loc4[i, :, 0], host)
                      if self._uses_nms() else M.hardest(candidates, losses[i], count))
            match[i, 0], negatives[i] = M.apply_mining(found, chosen, hard)
        return {"match": match, "negatives": negatives}

    def _uses_nms(self) -> bool:
        return self.p.HasField("nms_param") and self.p.nms_param.nms_threshold > 0

    def _after_nms(self, candidates, losses, count, loc: torch.Tensor, host) -> np.ndarray:
        """SSD's mining with ``nms_param``: NMS by loss over the candidates' priors
        (``use_prior_for_nms``) or decoded predictions, then the first ``count`` kept."""
        boxes = host[0] if self.p.use_prior_for_nms else decode_boxes(
            _host(loc), host[0], host[1], self.p.code_type, self.p.encode_variance_in_target)
        nms = self.p.nms_param
        return M.hardest_after_nms(candidates, losses, count, boxes, nms.nms_threshold,
                                   int(nms.top_k))

    def _mining_losses(self, gt: dict, match: np.ndarray, scores: np.ndarray,
                       loc4: torch.Tensor, host: np.ndarray) -> np.ndarray:
        """``[N, P]`` float32 per-prior losses SSD ranks by: the confidence loss against the
        matched label (background when unmatched), plus for HARD_EXAMPLE the box loss."""
        labels = self._prior_labels(gt, match, agnostic=False)
        rank = (M.softmax_losses if self.p.conf_loss_type == _P.SOFTMAX
                else M.logistic_losses)
        losses = np.stack([rank(s, l) for s, l in zip(scores, labels)])
        if self.mining == _P.HARD_EXAMPLE:
            with torch.no_grad():
                _, per_box, where = self._box_terms(loc4, gt, match, host)
            np.add.at(losses, (where[0], where[2]), per_box.to("cpu", torch.float32).numpy())
        return losses

    def _prior_labels(self, gt: dict, match: np.ndarray, agnostic: bool) -> np.ndarray:
        """``[N, P]`` class of each prior: its matched gt's label (``background + 1`` with
        ``map_object_to_agnostic``), else the background."""
        n, _, count = match.shape
        labels = np.full((n, count), self.background, dtype=np.int64)
        for i, c, j in zip(*np.nonzero(match > -1)):
            label = self.background + 1 if agnostic else int(gt[i].labels[match[i, c, j]])
            if not 0 <= label < self.num_classes:
                raise self.error(f"ground-truth label {label} of image {i} is outside "
                                 f"[0, {self.num_classes})")
            labels[i, j] = label
        return labels

    # -- the two losses --------------------------------------------------------------------
    def _box_terms(self, loc4: torch.Tensor, gt: dict, match: np.ndarray, host: np.ndarray):
        """(sum, per-match losses, (image, class, prior) of each match) of the box loss."""
        pred, target, where = self._box_pairs(loc4, gt, match, host)
        diff = pred - target
        if self.p.loc_loss_type == _P.SMOOTH_L1:
            per = torch.where(diff.abs() < 1, 0.5 * diff * diff, diff.abs() - 0.5)
        else:
            per = 0.5 * diff * diff
        per_box = per.sum(dim=1)
        return per_box.sum(), per_box, where

    def _box_pairs(self, loc4: torch.Tensor, gt: dict, match: np.ndarray, host: np.ndarray):
        """The matched predictions ``[K, 4]`` and their targets, as SSD's
        EncodeLocPrediction forms them, and where the matches are."""
        where = np.nonzero(match > -1)
        images, classes, priors = where
        truth = np.zeros((len(images), 4), dtype=F32)
        for k, (i, c, j) in enumerate(zip(*where)):
            truth[k] = gt[i].boxes[match[i, c, j]]
        p = self.p
        target = M.encode_boxes(truth, host[0][priors], host[1][priors], p.code_type,
                                p.encode_variance_in_target)
        on_device = partial(torch.as_tensor, device=loc4.device)
        pred = loc4[on_device(images), on_device(priors), on_device(classes)]
        if p.bp_inside:   # the target itself stands in: no loss, no gradient
            outside = on_device(self._outside(loc4, host, where))
            pred = torch.where(outside, on_device(target, dtype=pred.dtype), pred)
        if p.encode_variance_in_target:
            var = host[1][priors]
            if np.any(var <= 0):
                raise self.error("prior variances must be positive")
            pred = _DivideKeepGrad.apply(pred, on_device(var, dtype=pred.dtype))
            target = (target / var).astype(F32)
        return pred, on_device(target, dtype=pred.dtype), where

    def _outside(self, loc4: torch.Tensor, host: np.ndarray, where) -> np.ndarray:
        """``bp_inside``: the coordinates whose matched box (the prior, or the decoded
        prediction without use_prior_for_matching) lies outside [0, 1]."""
        images, classes, priors = where
        boxes = host[0][priors]
        if not self.p.use_prior_for_matching:
            pred = _host(loc4)[images, priors, classes]
            boxes = decode_boxes(pred, boxes, host[1][priors], self.p.code_type,
                                 self.p.encode_variance_in_target)
        return (boxes < 0) | (boxes > 1)

    def _loc_loss(self, loc4, gt, match, host) -> tuple[torch.Tensor, int]:
        total, _, where = self._box_terms(loc4, gt, match, host)
        return total, len(where[0])

    def _conf_loss(self, scores: torch.Tensor, gt: dict, selected: dict) -> torch.Tensor:
        """Summed confidence loss over the chosen rows (SSD's inner loss layers normalise by
        1: SoftmaxWithLoss with NONE, SigmoidCrossEntropyLoss over a batch of one)."""
        match, negatives = selected["match"], selected["negatives"]
        labels = self._prior_labels(gt, match, agnostic=self.p.map_object_to_agnostic)
        if self.mining == _P.NONE:
            rows, row_labels = scores.reshape(-1, self.num_classes), labels.reshape(-1)
            is_negative = None
        else:
            rows, row_labels, is_negative = self._mined_rows(scores, labels, match, negatives)
        device = scores.device
        if self.p.conf_loss_type == _P.SOFTMAX:
            lab = torch.as_tensor(row_labels, device=device)
            logp = F.log_softmax(rows, dim=1).gather(1, lab[:, None])
            return -_clamped_log(logp, FLT_MIN).sum()
        target = self._logistic_targets(row_labels, is_negative, match)
        target = torch.as_tensor(target, dtype=rows.dtype, device=device).reshape(rows.shape)
        return F.binary_cross_entropy_with_logits(rows, target, reduction="sum")

    def _mined_rows(self, scores, labels, match, negatives):
        """Rows of each image in SSD's order: its positives, then its negatives; with their
        labels and which rows are negatives."""
        parts = [np.zeros((0, 3), dtype=np.int64)]          # (image, prior, is negative)
        for i in range(match.shape[0]):
            positives = np.flatnonzero((match[i] > -1).any(axis=0))
            for chosen, flag in ((positives, 0), (negatives[i], 1)):
                parts.append(np.stack([np.full(len(chosen), i), chosen,
                                       np.full(len(chosen), flag)], axis=1))
        images, chosen, negative = np.concatenate(parts).astype(np.int64).T
        rows = scores[torch.as_tensor(images, device=scores.device),
                      torch.as_tensor(chosen, device=scores.device)]
        return rows, labels[images, chosen], negative.astype(bool)

    def _logistic_targets(self, row_labels, is_negative, match) -> np.ndarray:
        """SSD's targets for the logistic loss, filled with the background id and set to 1 at
        a positive's class and (when mining) at a negative's background class."""
        c, bg = self.num_classes, self.background
        target = np.full(len(row_labels) * c, float(bg), dtype=np.float64)
        if is_negative is None:
            # SSD steps image i's targets by P (not P·C): kept for the same values.
            n, _, count = match.shape
            i, j = np.nonzero((match > -1).any(axis=1))
            target[i * count + j * c + row_labels.reshape(n, count)[i, j]] = 1
            return target
        rows = np.arange(len(row_labels))
        positive = ~is_negative
        target[rows[positive] * c + row_labels[positive]] = 1
        target[rows[is_negative] * c + bg] = 1
        return target


def _host(t: torch.Tensor) -> np.ndarray:
    """A float32 NumPy copy for the matching, as SSD reads its blobs into float boxes."""
    return t.detach().to("cpu", torch.float32).numpy()
