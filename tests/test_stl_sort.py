"""stl_sort.sort_descending against libstdc++ itself: a small C++ program runs ``std::sort``
(and ``std::partial_sort`` over the whole range, the heapsort that introsort falls back to)
with SSD's ``SortScorePairDescend`` on the same keys, many of them tied."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from caffe_compat.engine.layers import stl_sort

PROGRAM = r"""
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>
typedef std::pair<float, std::pair<int, int> > Pair;
static bool descend(const Pair& a, const Pair& b) { return a.first > b.first; }
int main(int argc, char** argv) {
  const bool heap = argc > 1 && std::strcmp(argv[1], "heap") == 0;
  int n;
  while (std::scanf("%d", &n) == 1) {
    std::vector<Pair> v;
    for (int i = 0; i < n; ++i) {
      float x;
      std::scanf("%f", &x);
      v.push_back(std::make_pair(x, std::make_pair(0, i)));
    }
    if (heap) std::partial_sort(v.begin(), v.end(), v.end(), descend);
    else std::sort(v.begin(), v.end(), descend);
    for (int i = 0; i < n; ++i) std::printf("%d ", v[i].second.second);
    std::printf("\n");
  }
}
"""

# g++ 12 (libstdc++) std::sort on these keys, the same since GCC 4.9's median of three.
KEYS = np.array([0.25, 0.5, 0.25, 0.75, 0.5, 0.5, 0.25, 0.75, 0.25, 0.5, 0.75, 0.25, 0.5, 0.25,
                 0.5, 0.75, 0.25, 0.5, 0.25, 0.5], np.float32)
LIBSTDCXX_ORDER = [15, 3, 10, 7, 19, 17, 14, 12, 9, 5, 4, 1, 8, 6, 11, 13, 2, 16, 18, 0]


def test_ties_land_where_libstdcxx_puts_them():
    order = stl_sort.sort_descending(KEYS)
    np.testing.assert_array_equal(order, LIBSTDCXX_ORDER)
    assert not np.array_equal(order, np.argsort(-KEYS, kind="stable"))


def tie_cases(rng) -> list[np.ndarray]:
    cases = []
    for n in [17, 18, 31, 32, 33, 100, 257, 1500]:
        cases += [(rng.integers(0, levels, n) / 8).astype(np.float32) for levels in (1, 2, 3, 50)]
        runs = np.sort(rng.integers(0, 5, n)).astype(np.float32)
        cases += [runs, runs[::-1].copy(), np.tile(np.float32([1, 0, 0.5]), n)[:n]]
    return cases


def heap_sorted(keys: np.ndarray) -> list[int]:
    items = [(float(k), i) for i, k in enumerate(keys.tolist())]
    stl_sort._make_heap(items, 0, len(items))
    stl_sort._sort_heap(items, 0, len(items))
    return [i for _, i in items]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to run libstdc++'s std::sort")
def test_sort_and_heapsort_equal_libstdcxx(tmp_path):
    source, binary = tmp_path / "sort.cpp", tmp_path / "sort"
    source.write_text(PROGRAM)
    subprocess.run(["g++", "-O1", "-o", str(binary), str(source)], check=True)
    cases = tie_cases(np.random.default_rng(1))
    text = "".join(f"{len(c)} " + " ".join(repr(float(x)) for x in c) + "\n" for c in cases)
    for mode, ours in (([], stl_sort.sort_descending), (["heap"], heap_sorted)):
        out = subprocess.run([str(binary), *mode], input=text, capture_output=True, text=True,
                             check=True).stdout.splitlines()
        for keys, line in zip(cases, out, strict=True):
            np.testing.assert_array_equal(ours(keys), np.array(line.split(), dtype=np.int64),
                                          err_msg=f"{mode or 'sort'}, {len(keys)} keys")
