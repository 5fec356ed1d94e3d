"""emo_mqtt.scenarios (lives in scenarios/ at the top of the repository)."""
