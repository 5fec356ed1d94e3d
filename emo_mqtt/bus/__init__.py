"""The project's bus interface: every node publishes and subscribes through a :class:`Bus`.

``MqttBus`` (``emo_mqtt.bus.mqtt``) is the only code that talks to aiomqtt; it is imported
lazily by :func:`open_bus` so that pure modules and unit tests never load an MQTT client.
"""

from __future__ import annotations

from typing import Any

from emo_mqtt.bus.base import Bus, BusOptions, BusStats, Message
from emo_mqtt.bus.memory import MemoryBroker, MemoryBus

__all__ = ["Bus", "BusOptions", "BusStats", "MemoryBroker", "MemoryBus", "Message", "open_bus"]


def open_bus(broker: str | MemoryBroker, client_id: str, **kwargs: Any) -> Bus:
    """A bus to ``broker``: an ``mqtt://``/``mqtts://`` URL, or a :class:`MemoryBroker`.

    The bus is not connected yet: use ``async with open_bus(...) as bus``.
    """
    if isinstance(broker, MemoryBroker):
        kwargs = {k: v for k, v in kwargs.items() if k in {"will", "clean_start", "options"}}
        return MemoryBus(broker, client_id, **kwargs)
    from emo_mqtt.bus.mqtt import MqttBus

    return MqttBus(broker, client_id, **kwargs)
