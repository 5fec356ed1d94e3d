"""emo_mqtt.broker (lives in broker/ at the top of the repository).

The MQTT broker emo-mqtt runs against in development, tests and the demo: the shipped
Mosquitto config (``mosquitto.conf``), a launcher (:mod:`.launch`) and broker URLs
(:mod:`.url`).
"""

from .launch import BrokerHandle, find_free_port, find_mosquitto, run_foreground
from .url import BrokerURL, parse_broker_url

__all__ = [
    "BrokerHandle",
    "BrokerURL",
    "find_free_port",
    "find_mosquitto",
    "parse_broker_url",
    "run_foreground",
]
