"""What strategies share: the messages they ask to send and the state of a round."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from emo_mqtt.topics import Kind

__all__ = ["Outgoing", "RoundState"]


@dataclass(frozen=True)
class Outgoing:
    """One message a strategy wants published: on ``kind``'s topic (for ``node``).

    ``message`` is one of :mod:`emo_mqtt.messages`' classes; ``background`` marks bulk data
    that yields to the sender's other messages on its link (activations).
    """

    kind: Kind
    node: str | None
    message: Any
    retain: bool = False
    qos: int = 1
    background: bool = False


class RoundState(Enum):
    """Where the server is in its run: explicit, rather than read off attributes."""

    #: Before round 1 (waiting for the fleet, or restored from a checkpoint).
    IDLE = "idle"
    #: A round is announced and its updates are being collected.
    COLLECTING = "collecting"
    #: The round closed (aggregated or not); its evaluation and record come next.
    CLOSED = "closed"
    #: Every round is done; the final model is out.
    FINISHED = "finished"
