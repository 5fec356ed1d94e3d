"""The message log of a run: one row per whole message a node published.

``emo run`` attaches a :class:`MessageLog` to every node's bus (``Bus.on_published``) and
writes ``<out>/<algorithm>/messages.csv``; ``emo traffic summary|replay`` read it
(``docs/traffic.md``). Only sizes are logged, never payloads.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

#: The columns of ``messages.csv``, in order (docs/traffic.md gives their units).
COLUMNS = ("time_s", "ack_s", "sender", "topic", "bytes", "qos", "retain")

Recorder = Callable[[str, int, int, bool, float, float], None]


class MessageLog:
    """Rows ``(time_s, ack_s, sender, topic, bytes, qos, retain)`` relative to ``origin``."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.rows: list[tuple[float, float, str, str, int, int, int]] = []

    def recorder(self, sender: str) -> Recorder:
        """A ``Bus.on_published`` callback that logs ``sender``'s messages."""

        def record(
            topic: str, nbytes: int, qos: int, retain: bool, started: float, finished: float
        ) -> None:
            self.rows.append(
                (
                    started - self.origin,
                    finished - self.origin,
                    sender,
                    topic,
                    nbytes,
                    qos,
                    int(retain),
                )
            )

        return record

    @property
    def total_bytes(self) -> int:
        return sum(row[4] for row in self.rows)

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(COLUMNS)
            for t, ack, sender, where, nbytes, qos, retain in sorted(self.rows, key=lambda r: r[1]):
                out.writerow((f"{t:.6f}", f"{ack:.6f}", sender, where, nbytes, qos, retain))
