"""Walk a whole LMDB/LevelDB in a throwaway process: ``python db_probe.py PATH BACKEND FULL``.

Run as a script (not imported as part of the package, so the child starts in milliseconds:
only ``lmdb`` or ``plyvel`` is loaded). A corrupt database can make liblmdb abort or touch
memory past the end of the file (SIGABRT, SIGBUS, SIGSEGV); here that kills only this child,
and ``db_guard`` turns the death into a clean error. Every key is visited by the cursor and
looked up again from the root (the path the Data layer's reads take); with FULL=1 every value
is copied too, so every overflow page is touched once. Exit status 0: the walk finished; 3: the
library reported an error (its one-line text on stderr).
"""
import sys


def _walk_lmdb(path: str, full: bool) -> int:
    import lmdb
    env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True,
                    max_readers=4)
    count = 0
    with env.begin(buffers=not full) as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            value = txn.get(key)
            if value is None:
                raise lmdb.CorruptedError(f"key {bytes(key)!r} listed but not found")
            count += 1
    env.close()
    return count


def _walk_leveldb(path: str, full: bool) -> int:
    import plyvel
    db = plyvel.DB(path, create_if_missing=False, paranoid_checks=True)
    count = 0
    for key in db.iterator(include_value=False, verify_checksums=True, fill_cache=False):
        if full and db.get(key, verify_checksums=True, fill_cache=False) is None:
            raise plyvel.CorruptionError(f"key {key!r} listed but not found")
        count += 1
    db.close()
    return count


def main(argv) -> int:
    path, backend, full = argv[0], argv[1], argv[2] == "1"
    try:
        count = (_walk_lmdb if backend == "lmdb" else _walk_leveldb)(path, full)
    except Exception as exc:  # the library's own error: reported as one line, status 3
        text = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(f"{type(exc).__name__}: {text}\n")
        return 3
    sys.stdout.write(f"{count}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
