"""Sans-I/O strategies: what each algorithm does with messages, apart from how they travel.

A strategy is synchronous and owns no bus, no event loop and no clock: it takes typed
messages (:mod:`emo_mqtt.messages`) and the current time, and returns the messages to send
(:class:`Outgoing`) and, when a round closes, its record. The nodes (``emo_mqtt.nodes``)
are drivers around them: they receive frames, validate them, feed the strategy, publish what
it returns and run its heavy compute (training, evaluation) in the compute pool.
"""

from __future__ import annotations

from emo_mqtt.strategies.base import Outgoing, RoundState

__all__ = ["Outgoing", "RoundState"]
