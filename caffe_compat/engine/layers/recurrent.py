"""Recurrent layers: LSTMUnit, LSTM and RNN (``recurrent_layer.cpp``, ``lstm_layer.cpp``,
``rnn_layer.cpp``, ``lstm_unit_layer.cpp``).

Caffe unrolls LSTM and RNN into an internal net over the T time steps of bottom 0 (shape
``(T, N, ...)``); bottom 1, ``cont`` ``(T, N)``, is 0 where a sequence starts, which zeroes
the previous hidden (and cell) state for that stream. An optional static input ``(N, ...)``
is projected once and added at every step. Here the same algebra runs as a loop over t.

State between calls: without ``expose_hidden`` the final states of one forward are the
initial states of the next (Caffe copies h_T into h_0), so a batch with ``cont = 1`` at t=0
continues the previous batch; the first call starts from zeros. With ``expose_hidden`` the
initial states are extra bottoms and the final ones extra tops. As in Caffe 1.0, no
gradient reaches the initial-state bottoms and the final-state tops' diffs are ignored.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from caffe_compat.engine.fillers import FillerError, fill
from caffe_compat.engine.layers.base import Layer, Shape, register


class _LSTMUnitFunction(torch.autograd.Function):
    """One LSTM step with Caffe's backward. Gates in x: i, f, o, g (each H wide);
    ``f = cont * sigmoid(x_f)``, ``c = f c_prev + i g``, ``h = o tanh(c)``. Caffe's forget
    gate diff is ``dc · c_prev · f (1 - f)`` (exact for 0/1 ``cont``)."""

    @staticmethod
    def forward(ctx, c_prev, x, cont):       # (N, H), (N, 4H), (N,)
        hdim = c_prev.shape[-1]
        i, f, o = (torch.sigmoid(x[:, k * hdim:(k + 1) * hdim]) for k in range(3))
        g = torch.tanh(x[:, 3 * hdim:])
        f = torch.where(cont[:, None] == 0, torch.zeros_like(f), cont[:, None] * f)
        c = f * c_prev + i * g
        tanh_c = torch.tanh(c)
        ctx.save_for_backward(c_prev, i, f, o, g, tanh_c)
        return c, o * tanh_c

    @staticmethod
    def backward(ctx, dc, dh):
        c_prev, i, f, o, g, tanh_c = ctx.saved_tensors
        dc = torch.zeros_like(c_prev) if dc is None else dc
        dh = torch.zeros_like(c_prev) if dh is None else dh
        c_term = dc + dh * o * (1 - tanh_c * tanh_c)
        dx = torch.cat([c_term * g * i * (1 - i), c_term * c_prev * f * (1 - f),
                        dh * tanh_c * o * (1 - o), c_term * i * (1 - g * g)], dim=1)
        return c_term * f, dx, None


def lstm_step(c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor):
    """(c, h) for one time step; shapes (N, H), (N, 4H), (N,)."""
    return _LSTMUnitFunction.apply(c_prev, gates, cont.to(gates.dtype))


@register
class LSTMUnit(Layer):
    """One LSTM step: bottoms c_prev ``(1, N, H)``, gates ``(1, N, 4H)``, cont ``(1, N)``;
    tops c and h ``(1, N, H)``."""

    type = "LSTMUnit"
    num_bottoms = (3, 3)
    num_tops = (2, 2)
    no_grad_bottoms = (2,)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        c, x, cont = (tuple(s) for s in bottom_shapes)
        if len(c) != 3 or c[0] != 1 or x != (1, c[1], 4 * c[2]) or cont != (1, c[1]):
            raise self.error(f"bottoms must be c_prev (1, N, H), gates (1, N, 4H) and cont "
                             f"(1, N); got {list(c)}, {list(x)}, {list(cont)}")
        return [c, c]

    def forward(self, c_prev, x, cont):
        self.top_shapes([tuple(c_prev.shape), tuple(x.shape), tuple(cont.shape)])
        c, h = lstm_step(c_prev[0], x[0], cont[0])
        return c[None], h[None]


class _Recurrent(Layer):
    """Shared shape rules, parameters and state of LSTM and RNN."""

    num_bottoms = (2, 5)
    num_tops = (1, 3)
    no_grad_bottoms = (1,)
    num_states = 1            # recurrent blobs: RNN h; LSTM h and c

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        rp = param.recurrent_param
        self.hidden = rp.num_output
        if self.hidden <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        self.expose = rp.expose_hidden
        exposed = self.num_states if self.expose else 0
        n_bottoms = len(bottom_shapes)
        if not 2 + exposed <= n_bottoms <= 3 + exposed:
            raise self.error(f"takes {2 + exposed} or {3 + exposed} bottoms (x, cont, "
                             f"[static input]{', initial states' if exposed else ''}), got "
                             f"{n_bottoms}")
        if param.top and len(param.top) != 1 + exposed:
            raise self.error(f"takes {1 + exposed} top(s) with expose_hidden "
                             f"{str(self.expose).lower()}, got {len(param.top)}")
        self.static = n_bottoms > 2 + exposed
        self.no_grad_bottoms = (1,) + tuple(range(2 + self.static, n_bottoms))
        x = tuple(bottom_shapes[0])
        self.input_dim = math.prod(x[2:])
        self.static_dim = math.prod(bottom_shapes[2][1:]) if self.static else 0
        self._fillers = (rp.weight_filler if rp.HasField("weight_filler") else None,
                         rp.bias_filler if rp.HasField("bias_filler") else None)
        self._state: list[torch.Tensor] | None = None
        self.top_shapes(bottom_shapes)

    def _weight(self, rows: int, cols: int) -> None:
        self._add(self._fillers[0], (rows, cols), "weight_filler")

    def _bias(self, rows: int) -> None:
        self._add(self._fillers[1], (rows,), "bias_filler")

    def _add(self, filler, shape: Shape, what: str) -> None:
        try:
            self.add_blob(fill(filler, shape))
        except FillerError as e:
            raise self.error(f"recurrent_param.{what}: {e}") from None

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        x, cont = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if len(x) < 2 or cont != x[:2]:
            raise self.error(f"bottom 0 must be (T, N, ...) and bottom 1 (cont) (T, N); got "
                             f"{list(x)} and {list(cont)}")
        if math.prod(x[2:]) != self.input_dim:
            raise self.error(f"bottom 0 has {math.prod(x[2:])} values per step, the layer was "
                             f"built for {self.input_dim}")
        state = (1, x[1], self.hidden)
        if self.static:
            s = tuple(bottom_shapes[2])
            if not s or s[0] != x[1] or math.prod(s[1:]) != self.static_dim:
                raise self.error(f"static input must be (N={x[1]}, ...) with {self.static_dim} "
                                 f"values per stream, got {list(s)}")
        for k, s in enumerate(bottom_shapes[2 + self.static:]):
            if tuple(s) != state:
                raise self.error(f"initial state bottom {2 + self.static + k} must be "
                                 f"{list(state)}, got {list(s)}")
        return [(x[0], x[1], self.hidden)] + [state] * (self.num_states if self.expose else 0)

    def _initial_states(self, bottoms, like: torch.Tensor) -> list[torch.Tensor]:
        """(N, H) starting states: the exposed bottoms (cut from the graph) or the carry."""
        n = like.shape[1]
        if self.expose:
            return [b.detach()[0].to(like.dtype) for b in bottoms[2 + self.static:]]
        carry = self._state
        if carry is None or carry[0].shape != (n, self.hidden) or carry[0].dtype != like.dtype \
                or carry[0].device != like.device:
            carry = [like.new_zeros(n, self.hidden) for _ in range(self.num_states)]
        return carry

    def forward(self, *bottoms: torch.Tensor):
        self.top_shapes([tuple(b.shape) for b in bottoms])
        x, cont = bottoms[0], bottoms[1].detach().to(bottoms[0].dtype)
        t_steps, n = x.shape[0], x.shape[1]
        static = bottoms[2].reshape(n, -1) if self.static else None
        states = self._initial_states(bottoms, x)
        outputs, finals = self._unroll(x.reshape(t_steps, n, -1), cont, static, states)
        self._state = [s.detach() for s in finals]
        top = torch.stack(outputs)
        if not self.expose:
            return top
        return (top, *(s.detach()[None] for s in finals))

    def _unroll(self, x, cont, static, states):  # pragma: no cover - abstract
        raise NotImplementedError


@register
class LSTM(_Recurrent):
    """Caffe LSTM. Blobs W_xc ``(4H, D)``, b_c ``(4H,)``, [W_xc_static ``(4H, Ds)``,]
    W_hc ``(4H, H)``; per step ``gates = W_xc x_t + b_c [+ W_xc_static s] + W_hc (cont_t
    h_{t-1})``, then an LSTMUnit. Top h ``(T, N, H)``; exposed states h_0, c_0 → h_T, c_T."""

    type = "LSTM"
    num_states = 2

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self._weight(4 * self.hidden, self.input_dim)
        self._bias(4 * self.hidden)
        if self.static:
            self._weight(4 * self.hidden, self.static_dim)
        self._weight(4 * self.hidden, self.hidden)

    def _unroll(self, x, cont, static, states):
        w_hc = self.blobs[2 + self.static]
        gates_x = F.linear(x, self.blobs[0], self.blobs[1])           # (T, N, 4H)
        if static is not None:
            gates_x = gates_x + F.linear(static, self.blobs[2])[None]
        h, c = states
        outputs = []
        for t in range(x.shape[0]):
            gates = gates_x[t] + F.linear(cont[t][:, None] * h, w_hc)
            c, h = lstm_step(c, gates, cont[t])
            outputs.append(h)
        return outputs, [h, c]


@register
class RNN(_Recurrent):
    """Caffe RNN. Blobs W_xh ``(H, D)``, b_h, [W_xh_static ``(H, Ds)``,] W_hh ``(H, H)``,
    W_ho ``(H, H)``, b_o; ``h_t = tanh(W_xh x_t + b_h [+ W_xh_static s] + W_hh (cont_t
    h_{t-1}))`` and output ``o_t = tanh(W_ho h_t + b_o)``. Exposed state h_0 → h_T."""

    type = "RNN"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self._weight(self.hidden, self.input_dim)
        self._bias(self.hidden)
        if self.static:
            self._weight(self.hidden, self.static_dim)
        self._weight(self.hidden, self.hidden)
        self._weight(self.hidden, self.hidden)
        self._bias(self.hidden)

    def _unroll(self, x, cont, static, states):
        k = 2 + self.static
        w_hh, w_ho, b_o = self.blobs[k], self.blobs[k + 1], self.blobs[k + 2]
        pre = F.linear(x, self.blobs[0], self.blobs[1])                # (T, N, H)
        if static is not None:
            pre = pre + F.linear(static, self.blobs[2])[None]
        (h,) = states
        outputs = []
        for t in range(x.shape[0]):
            h = torch.tanh(pre[t] + F.linear(cont[t][:, None] * h, w_hh))
            outputs.append(torch.tanh(F.linear(h, w_ho, b_o)))
        return outputs, [h]
