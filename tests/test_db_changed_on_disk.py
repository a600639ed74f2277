"""A database changed on disk while (or after) this process reads it: one clean line naming the
file, never a signal. LMDB and LevelDB map their files, so a file truncated under a live
mapping kills the reader with SIGBUS; the cases that could do that run in a child process, so
a regression fails the test instead of killing pytest."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from caffe_compat.data.db import DBWriter, open_db
from caffe_compat.data.prefetch import Prefetcher
from caffe_compat.formats.blob_io import array_to_datum
from caffe_compat.formats.errors import DataError

REPO = Path(__file__).resolve().parent.parent


def _db(path, backend="lmdb", n=40, fill=0):
    rng = np.random.default_rng(fill)
    with DBWriter(path, backend) as w:
        for i in range(n):
            image = rng.integers(0, 255, (3, 32, 32), dtype=np.uint8)
            w.put(f"{i:08d}", array_to_datum(image, i).SerializeToString())
    return path


# Reads every record, truncates (or rewrites shorter, same inode) the largest mapped file (a
# LevelDB's first table is written by its first open), reads again.
_READ_AFTER_CHANGE = """
import os, sys
from caffe_compat.data.db import open_db
from caffe_compat.formats.errors import DataError
folder, how = sys.argv[1:3]
db = open_db(folder)
keys = db.keys()
db.get_many(keys)
tables = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith((".mdb", ".ldb"))]
target = max(tables, key=os.path.getsize)
print(target, os.path.getsize(target))
if how == "truncate":
    os.truncate(target, 4096)
else:
    data = open(target, "rb").read()
    with open(target, "wb") as f:
        f.write(data[: len(data) // 2])
try:
    db.get_many(keys)
    print("READ")
except DataError as exc:
    print("ERROR", exc)
"""


def _isolated(code: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_a_mapped_file_changed_in_place_is_a_clean_error_not_sigbus(tmp_path, backend, how):
    folder = _db(tmp_path / "db", backend)
    done = _isolated(_READ_AFTER_CHANGE, folder, how)
    assert done.returncode == 0, f"reader died (status {done.returncode}): {done.stderr[-500:]}"
    first, out = done.stdout.strip().split("\n")
    target, size = first.rsplit(" ", 1)
    assert int(size) > 65536, "the test should change the file holding the records"
    assert out.startswith("ERROR"), out
    assert f"{target}: modified in place while open" in out


def test_a_replaced_database_is_read_afresh_while_old_readers_keep_theirs(tmp_path):
    """Writers build a new file and rename it over the old: the old mapping stays valid for
    its readers, and the next open reads the new records (not the old handle's)."""
    folder = _db(tmp_path / "db", fill=1)
    old = open_db(folder)
    first_old = old.get(old.keys()[0])
    with DBWriter(folder, "lmdb", overwrite=True) as w:    # a new folder renamed over it
        w.put("00000000", b"new record")
    with open_db(folder) as new:
        first_new = new.get(new.keys()[0])
    assert first_new != first_old
    assert old.get(old.keys()[0]) == first_old
    old.close()


_REOPEN_AFTER_IN_PLACE_COPY = """
import shutil, sys
from caffe_compat.data.db import open_db
from caffe_compat.formats.errors import DataError
folder, other = sys.argv[1:3]
held = open_db(folder)         # a reader still open, e.g. a prefetch thread not yet stopped
held.keys()
shutil.copyfile(other, folder + "/data.mdb")     # the same inode, new contents
try:
    db = open_db(folder)
    db.get_many(db.keys())
    print("READ")
except DataError as exc:
    print("ERROR", exc)
"""


def test_reopening_a_database_rewritten_in_place_under_an_open_reader(tmp_path):
    """The stale handle (mapping the old contents) is never handed to the new reader."""
    folder = _db(tmp_path / "db", n=40)
    other = _db(tmp_path / "other", n=400, fill=3) / "data.mdb"
    done = _isolated(_REOPEN_AFTER_IN_PLACE_COPY, folder, other)
    assert done.returncode == 0, f"reader died (status {done.returncode}): {done.stderr[-500:]}"
    out = done.stdout.strip()
    assert out.startswith("ERROR") and "modified in place while open" in out, out
    assert "still has it open" in out


def test_a_rewrite_keeping_size_and_mtime_is_probed_again(tmp_path):
    """The probe's memory is keyed on more than (path, size, mtime): a file rewritten with
    the same size and its mtime put back is walked again, and its corruption is found."""
    folder = _db(tmp_path / "db", n=5)
    open_db(folder).close()                      # probed once, passed
    mdb = folder / "data.mdb"
    st = mdb.stat()
    raw = mdb.read_bytes()
    assert raw.count(b"00000001") == 1
    mdb.write_bytes(raw.replace(b"00000001", b"00000009"))   # keys out of order: corrupt
    os.utime(mdb, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (mdb.stat().st_size, mdb.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(DataError, match="db: corrupt lmdb database"):
        open_db(folder)


def test_prefetcher_close_waits_for_the_batch_in_progress():
    """close() returns only once the workers stopped and on_exit ran, so the caller may
    delete or rewrite the files they were reading."""
    started, exited = threading.Event(), threading.Event()

    def produce(k):
        started.set()
        time.sleep(0.3)
        return k
    prefetcher = Prefetcher(produce, depth=2, workers=1, on_exit=exited.set)
    assert started.wait(10)
    prefetcher.close()
    assert exited.is_set()


def test_a_net_refused_after_its_data_layer_releases_the_database(tmp_path):
    """A later layer's error must not leave the Data layer's prefetch thread mapping the
    database: rewriting it in place and opening it again then works, even while the error's
    traceback (as an interactive session keeps it) still holds the half-built net."""
    import caffe_compat as caffe
    folder = _db(tmp_path / "db", n=40)
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(f'layer {{ name: "data" type: "Data" top: "data" top: "label"\n'
                        f'  data_param {{ source: "{folder}" batch_size: 8 backend: LMDB }} }}\n'
                        'layer { name: "bad" type: "Convolution" bottom: "data" top: "c" }\n')
    with pytest.raises(Exception, match="layer 'bad'") as refused:
        caffe.Net(str(net_file), caffe.TRAIN)
    other = _db(tmp_path / "other", n=40, fill=7) / "data.mdb"
    (folder / "data.mdb").write_bytes(other.read_bytes())        # in place: the same inode
    with open_db(folder) as db:
        assert len(db.keys()) == 40
    assert refused.tb is not None
