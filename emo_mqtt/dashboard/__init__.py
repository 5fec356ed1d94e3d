"""The web dashboard: subscribes to the fleet's status and metrics, serves a live page.

``emo dashboard --broker URL`` runs :func:`run_dashboard`; :func:`serve_dashboard` is the
same server as a coroutine (tests, embedding), :class:`FleetState` the pure state it shows
and :func:`prometheus_text` its Prometheus rendering.

The names are loaded on first use (PEP 562): importing the pure
:mod:`emo_mqtt.dashboard.state` or :mod:`emo_mqtt.dashboard.fleetview` must not pull in the
asyncio server with this package (tests/test_layering.py checks it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emo_mqtt.dashboard.server import run_dashboard, serve_dashboard
    from emo_mqtt.dashboard.state import FleetState, prometheus_text

__all__ = ["FleetState", "prometheus_text", "run_dashboard", "serve_dashboard"]

_HOMES = {
    "run_dashboard": "emo_mqtt.dashboard.server",
    "serve_dashboard": "emo_mqtt.dashboard.server",
    "FleetState": "emo_mqtt.dashboard.state",
    "prometheus_text": "emo_mqtt.dashboard.state",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
