"""emo_mqtt.broker (lives in broker/ at the top of the repository).

The MQTT broker emo-mqtt runs against in development, tests and the demo: the shipped
Mosquitto config (``mosquitto.conf``), a launcher (:mod:`.launch`) and broker URLs
(:mod:`.url`).

Import the submodule you need (``from emo_mqtt.broker.url import parse_broker_url``). This
package imports nothing itself: the bus parses broker URLs in every node process, and must not
pull in the launcher (subprocess, signal handlers, ``atexit`` hooks) with them.
"""
