"""SQLite's checkpoints, off the event loop.

In WAL mode each commit appends pages to the write-ahead log; by default the connection whose
commit takes the log past 1,000 pages then copies them into the database file and syncs it — a
few milliseconds, on whichever paid call is unlucky. The gateway turns that off on its own
connections and checkpoints from this thread instead, once a second (PASSIVE: it never waits for,
or blocks, a writer; the sqlite3 module lets go of the GIL while it works).
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("tollway.ledger")

EVERY_SECONDS = 1.0


class Checkpointer:
    def __init__(self, path: str, every: float = EVERY_SECONDS) -> None:
        self.path, self.every = path, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoints", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            while not self._stop.wait(self.every):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # (the next pass tries again; the log only grows meanwhile)
                    log.warning("ledger checkpoint failed: %s", exc)
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
