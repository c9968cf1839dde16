"""SQLite's checkpoints, off the event loop.

In WAL mode each commit appends pages to the write-ahead log; by default the connection whose
commit takes the log past 1,000 pages then copies them into the database file and syncs it — a
few milliseconds, on whichever paid call is unlucky. The gateway turns that off on its own
connections and checkpoints from this thread instead, once a second, in two steps:

1. PASSIVE, three times: copy the log into the database file without waiting for, or blocking,
   anyone (the sqlite3 module lets go of the GIL while it works). Each pass copies what was written
   during the one before, so each is shorter.
2. RESTART: with only the pages written during the last pass left, hold the writers off for the
   moment it takes to copy those and see that no reader still needs the log (giving up after
   ``RESTART_WAIT``), so that the next commit writes the log from its start again. Writers waited
   on it 4–5 ms (median; at most 12) after one passive pass, 0.9 ms (at most 2.7) after three, in
   a loop of a paid call's two transactions with 2 ms pauses.

Step 2 is what keeps the log small. SQLite starts the log over only when a commit finds every page
of it copied, and under steady load a commit always comes while a passive pass is copying: the log
was never started over. It grew by every page written (~100 KB a paid call, without bound), and each
write went to a new block of the file, which the kernel zeroes first (in a loop of a paid call's
two transactions, that nearly doubled their CPU). Started over, the log's writes land on blocks it
already has.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("tollway.ledger")

EVERY_SECONDS = 1.0
PASSIVE_PASSES = 3
RESTART_WAIT = 0.02  # seconds step 2 may wait for a writer or reader to finish (writers wait on it meanwhile)
LOG_SIZE_LIMIT = 128 * 2**20  # a log grown past this (a stall, a long reader) is cut back when it starts over


class Checkpointer:
    def __init__(self, path: str, every: float = EVERY_SECONDS) -> None:
        self.path, self.every = path, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoints", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=RESTART_WAIT, check_same_thread=False)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            while not self._stop.wait(self.every):
                self.checkpoint(conn)
            self.checkpoint(conn)
        finally:
            conn.close()

    @staticmethod
    def checkpoint(conn: sqlite3.Connection) -> None:
        try:
            for _ in range(PASSIVE_PASSES):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()  # (busy: the next pass tries again)
        except sqlite3.Error as exc:  # (the next pass tries again; the log only grows meanwhile)
            log.warning("ledger checkpoint failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
