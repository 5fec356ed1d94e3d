"""The web dashboard: subscribes to the fleet's status and metrics, serves a live page.

``emo dashboard --broker URL`` runs :func:`run_dashboard`; :func:`serve_dashboard` is the
same server as a coroutine (tests, embedding), :class:`FleetState` the pure state it shows
and :func:`prometheus_text` its Prometheus rendering.
"""

from emo_mqtt.dashboard.server import run_dashboard, serve_dashboard
from emo_mqtt.dashboard.state import FleetState, prometheus_text

__all__ = ["FleetState", "prometheus_text", "run_dashboard", "serve_dashboard"]
