"""emo-mqtt: Edge Model Overlays for federated learning on IoT fleets, over MQTT."""

from emo_mqtt.errors import (
    BrokerError,
    BusError,
    ChunkError,
    CodecError,
    ConfigError,
    EmoError,
    PublishTimeout,
    StateError,
    TopicError,
    UpdateRejected,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "BusError",
    "ChunkError",
    "CodecError",
    "ConfigError",
    "EmoError",
    "PublishTimeout",
    "StateError",
    "TopicError",
    "UpdateRejected",
    "__version__",
]
