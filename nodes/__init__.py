"""emo_mqtt.nodes (lives in nodes/ at the top of the repository)."""
