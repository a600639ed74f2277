"""SQLite records of datasets and jobs under the workdir; they outlive the server.

A record is a row with its state, options and result as JSON. At start-up ``recover`` marks
work that was running when the last server stopped: a job becomes ``interrupted`` (resumable
from its last snapshot), a dataset build ``failed``.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

TABLES = ("datasets", "jobs", "protocols")
SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT,
    pid INTEGER,
    options TEXT NOT NULL DEFAULT '{{}}',
    result TEXT NOT NULL DEFAULT '{{}}'
)"""
RUNNING = ("queued", "running")
_JSON = ("options", "result")


class Store:
    """Thread-safe access to the two tables (one connection, one lock)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()
        for table in TABLES:
            self._db.execute(SCHEMA.format(table=table))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _table(table: str) -> str:
        if table not in TABLES:
            raise ValueError(f"no table '{table}'")
        return table

    def add(self, table: str, name: str, state: str, options: dict) -> int:
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                f"INSERT INTO {self._table(table)} (name, state, created, updated, options) "
                "VALUES (?, ?, ?, ?, ?)", (name, state, now, now, json.dumps(options)))
            return int(cur.lastrowid)

    def get(self, table: str, ident: int) -> dict | None:
        with self._lock:
            row = self._db.execute(f"SELECT * FROM {self._table(table)} WHERE id = ?",
                                   (ident,)).fetchone()
        return _record(row) if row else None

    def all(self, table: str, state: str | None = None) -> list[dict]:
        query = f"SELECT * FROM {self._table(table)}"
        args: tuple = ()
        if state:
            query, args = query + " WHERE state = ?", (state,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id DESC", args).fetchall()
        return [_record(r) for r in rows]

    def update(self, table: str, ident: int, **fields) -> None:
        """Set columns; ``result`` is merged into the stored one, ``options`` replaced."""
        with self._lock:
            if "result" in fields:
                row = self._db.execute(f"SELECT result FROM {self._table(table)} WHERE id = ?",
                                       (ident,)).fetchone()
                merged = json.loads(row["result"]) if row else {}
                merged.update(fields["result"])
                fields["result"] = merged
            values = {k: json.dumps(v) if k in _JSON else v for k, v in fields.items()}
            values["updated"] = time.time()
            assignments = ", ".join(f"{k} = ?" for k in values)
            self._db.execute(f"UPDATE {self._table(table)} SET {assignments} WHERE id = ?",
                             (*values.values(), ident))

    def recover(self) -> list[tuple[str, int]]:
        """Mark what a previous server left running; returns (table, id) of each."""
        marked = []
        for table, new_state in (("jobs", "interrupted"), ("datasets", "failed")):
            for record in self.all(table):
                if record["state"] == "running" or (table == "datasets" and
                                                    record["state"] == "queued"):
                    self.update(table, record["id"], state=new_state, pid=None,
                                error="the dashboard stopped while this was running")
                    marked.append((table, record["id"]))
        return marked


def _record(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in _JSON:
        out[key] = json.loads(out[key] or "{}")
    return out


__all__ = ["Store", "TABLES", "RUNNING"]
