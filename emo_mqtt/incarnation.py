"""Run incarnations: which start of a run a server-side message belongs to.

A run id names a run; an *incarnation* names one start of its server. A broker that
crashed and restored its autosave, or a session queued from a run that ended long ago,
can hand a node messages of an earlier incarnation under the same run id: a retained
``server/done`` that would make devices quit, a round announcement with an old model.
Every message the server side sends carries its incarnation, and nodes follow it:

- an incarnation id starts with the server's start time (ns, hex), so ids order by start;
- a device or overlay follows the newest incarnation it has seen on a round announcement
  (or control, or SplitFed gradient) and rejects messages of older ones;
- ``done`` ends a node only when it comes from the incarnation it follows (or a newer one),
  and, when it was retained (on the broker before we subscribed), only from an incarnation
  confirmed by a message that came live: a crashed broker's autosave restores an old
  round *and* its ``done`` together, and neither may end a new start. (A node that joins
  after its run ended therefore waits for the next start of the server.);
- a node given the run's incarnation up front (``emo run`` knows it) is *pinned*: anything
  else is refused.

A server restarted from its checkpoint within a run is a new, newer incarnation: devices
move to it, and train the round it announces again (deterministic: the same update).

Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

__all__ = ["IncarnationTracker", "Verdict", "is_incarnation", "new_incarnation", "order"]

#: 16 hex digits of start time in ns, a dash, 6 random hex digits.
_RE = re.compile(r"[0-9a-f]{16}-[0-9a-f]{6}")


def new_incarnation(now_ns: int | None = None) -> str:
    """A fresh incarnation id, ordered after every one made earlier on this clock."""
    stamp = time.time_ns() if now_ns is None else now_ns
    return f"{stamp:016x}-{secrets.token_hex(3)}"


def is_incarnation(value: str) -> bool:
    """Whether ``value`` is an incarnation id (``""``, no incarnation, is not)."""
    return bool(_RE.fullmatch(value))


def order(value: str) -> tuple[int, str]:
    """Sort key: by start time, then the random part. ``""`` (a sender from before
    incarnations existed, or a hand-made message) sorts before every real one."""
    if not value:
        return (-1, "")
    return (int(value[:16], 16), value[17:])


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`IncarnationTracker.admit` decided: ``reason`` None means accepted."""

    reason: str | None = None
    #: The message moved the node to a newer incarnation (round tracking starts over).
    switched: bool = False


class IncarnationTracker:
    """The incarnation a device or overlay follows (see the module's rules)."""

    def __init__(self, pinned: str | None = None) -> None:
        self.pinned = pinned
        self.current: str | None = pinned
        #: Incarnations seen on a message that came live (not retained at subscribe time).
        self.confirmed: set[str] = set()
        #: Messages refused, by reason (also counted in the node's ``rejected``).
        self.refused: dict[str, int] = {}

    def _refuse(self, reason: str) -> Verdict:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return Verdict(reason)

    def admit(self, incarnation: str, *, ends_run: bool = False, retained: bool = False) -> Verdict:
        """Whether a server-side message of ``incarnation`` is for us.

        ``ends_run``: a ``done`` message, never followed blindly (see the module);
        ``retained``: the broker kept it from before we subscribed.
        """
        if self.pinned is not None:
            return Verdict() if incarnation == self.pinned else self._refuse("other_incarnation")
        if self.current is None and ends_run:
            return self._refuse("unknown_incarnation")
        if self.current is not None and order(incarnation) < order(self.current):
            return self._refuse("stale_incarnation")
        if ends_run and retained and incarnation not in self.confirmed:
            return self._refuse("unconfirmed_incarnation")
        if not retained:
            self.confirmed.add(incarnation)
        if incarnation == self.current:
            return Verdict()
        self.current = incarnation
        return Verdict(switched=True)
