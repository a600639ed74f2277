"""The order in which libstdc++'s ``std::sort`` leaves equal keys, for layers whose output
order Caffe decides with it (SSD's DetectionOutput sorts its ``keep_top_k`` candidates with
``std::sort`` on the score alone, which is not stable).

``std::sort`` there is introsort: quicksort on a median of three (elements 1, middle and
last), down to runs of 16, with heapsort past a depth of ``2·floor(log2 n)``; then one
insertion sort over everything. The steps below follow it move for move on ``[key, index]``
pairs, so ties end where Caffe's build puts them. Without ties every correct sort gives the
same order, and NumPy's is used; up to 16 elements insertion sort alone runs, which is stable.
"""
from __future__ import annotations

import numpy as np

RUN = 16  # libstdc++'s _S_threshold


def sort_descending(keys: np.ndarray) -> np.ndarray:
    """The permutation ``std::sort`` applies to ``keys`` with ``a > b`` as its ``less``."""
    n = len(keys)
    if n <= RUN or len(np.unique(keys)) == n:
        return np.argsort(-keys, kind="stable")
    items = [(float(k), i) for i, k in enumerate(keys.tolist())]
    _introsort(items, 0, n, 2 * (n.bit_length() - 1))
    if np.isnan(keys).any():
        _final_insertion_sort(items, 0, n)
    else:
        # the final pass is an insertion sort, which moves an element only past strictly
        # smaller keys: a stable sort, so Python's (stable) sort leaves the same order, in C
        # (SSD300's keep_top_k over 8000 tied scores: 3500 Python inserts, ~2 ms)
        items.sort(key=_negated_key)
    return np.fromiter((i for _, i in items), dtype=np.int64, count=n)


def _negated_key(item: tuple) -> float:
    return -item[0]


def _introsort(a: list, first: int, last: int, depth: int) -> None:
    while last - first > RUN:
        if depth == 0:
            _make_heap(a, first, last)
            _sort_heap(a, first, last)
            return
        depth -= 1
        _median_to_first(a, first, first + 1, first + (last - first) // 2, last - 1)
        cut = _partition(a, first + 1, last, a[first][0])
        _introsort(a, cut, last, depth)
        last = cut


def _median_to_first(a: list, result: int, x: int, y: int, z: int) -> None:
    kx, ky, kz = a[x][0], a[y][0], a[z][0]
    if kx > ky:
        pick = y if ky > kz else (z if kx > kz else x)
    else:
        pick = x if kx > kz else (z if ky > kz else y)
    a[result], a[pick] = a[pick], a[result]


def _partition(a: list, first: int, last: int, pivot: float) -> int:
    """Unguarded: the pivot sits just before ``first`` and stops the downward scan."""
    while True:
        while a[first][0] > pivot:
            first += 1
        last -= 1
        while pivot > a[last][0]:
            last -= 1
        if not first < last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def _adjust_heap(a: list, base: int, hole: int, length: int, value: tuple) -> None:
    """Sift the hole down to a leaf along the larger-in-``less`` child, then push up."""
    top = child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if a[base + child][0] > a[base + child - 1][0]:
            child -= 1
        a[base + hole] = a[base + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[base + hole] = a[base + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and a[base + parent][0] > value[0]:
        a[base + hole] = a[base + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[base + hole] = value


def _make_heap(a: list, first: int, last: int) -> None:
    length = last - first
    for parent in range((length - 2) // 2, -1, -1):
        _adjust_heap(a, first, parent, length, a[first + parent])


def _sort_heap(a: list, first: int, last: int) -> None:
    while last - first > 1:
        last -= 1
        value, a[last] = a[last], a[first]
        _adjust_heap(a, first, 0, last - first, value)


def _linear_insert(a: list, last: int) -> None:
    value = a[last]
    while value[0] > a[last - 1][0]:
        a[last] = a[last - 1]
        last -= 1
    a[last] = value


def _final_insertion_sort(a: list, first: int, last: int) -> None:
    """Guarded insertion over the first run (an element above the first goes to the front),
    unguarded over the rest: the quicksort left a smaller-or-equal key in front of each."""
    for i in range(first + 1, min(last, first + RUN)):
        if a[i][0] > a[first][0]:
            a[first:i + 1] = [a[i]] + a[first:i]
        else:
            _linear_insert(a, i)
    for i in range(first + RUN, last):
        _linear_insert(a, i)
