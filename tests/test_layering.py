"""The import contracts, checked at run time in a fresh interpreter.

``lint-imports`` (pyproject.toml, ``[tool.importlinter]``) checks the import graph
statically; it does not follow the implicit import of a parent package's ``__init__``. These
tests import the modules for real and look at what came with them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "emo_mqtt.errors",
    "emo_mqtt.codec",
    "emo_mqtt.topics",
    "emo_mqtt.chunking",
    "emo_mqtt.cache",
    "emo_mqtt.spill",
    "emo_mqtt.controller",
    "emo_mqtt.fedavg",
    "emo_mqtt.ensemble",
    "emo_mqtt.linkmodel",
    "emo_mqtt.netscenario",
    "emo_mqtt.config",
    "emo_mqtt.dataplan",
    "emo_mqtt.data",
    "emo_mqtt.models",
    "emo_mqtt.training",
    "emo_mqtt.partition",
    "emo_mqtt.seeds",
    "emo_mqtt.cifar",
    "emo_mqtt.messages",
    "emo_mqtt.algorithms",
    "emo_mqtt.strategies",
    "emo_mqtt.telemetry",
    "emo_mqtt.incarnation",
    "emo_mqtt.outdir",
    "emo_mqtt.resume",
    "emo_mqtt.aggregate_seeds",
    "emo_mqtt.sites",
    "emo_mqtt.mqttwire",
    "emo_mqtt.placement",
    "emo_mqtt.dashboard.state",
    "emo_mqtt.dashboard.fleetview",
]


def loaded_after(imports: list[str], *, besides: tuple[str, ...] = ()) -> set[str]:
    """Modules that importing ``imports`` adds to ``sys.modules`` in a new interpreter that
    has imported ``besides`` first."""
    code = "import sys\n" + "".join(f"import {m}\n" for m in besides)
    code += "before = set(sys.modules)\n" + "".join(f"import {m}\n" for m in imports)
    code += "print('\\n'.join(set(sys.modules) - before))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    return set(out.stdout.split())


def test_the_pure_core_loads_no_event_loop_client_bus_or_nodes() -> None:
    # torch itself imports asyncio: what counts is what our modules add to their libraries.
    loaded = loaded_after(PURE, besides=("numpy", "torch", "msgpack"))
    forbidden = {
        m
        for m in loaded
        if m.split(".")[0] in {"asyncio", "aiomqtt", "paho"}
        or m.startswith(("emo_mqtt.bus", "emo_mqtt.nodes", "emo_mqtt.shaping"))
    }
    assert not forbidden, f"the pure core pulled in {sorted(forbidden)}"


@pytest.mark.parametrize("module", ["emo_mqtt.bus", "emo_mqtt.bus.mqtt"])
def test_the_bus_does_not_load_the_broker_launcher(module: str) -> None:
    assert "emo_mqtt.broker.launch" not in loaded_after([module])
