"""``emo node ROLE``: one node of a fleet as its own process (on its own machine)."""

from __future__ import annotations

import logging
from pathlib import Path

from emo_mqtt.broker.url import BrokerURL
from emo_mqtt.config import ALGORITHMS, load_config
from emo_mqtt.dataplan import plan_data
from emo_mqtt.errors import ConfigError
from emo_mqtt.nodes import compute
from emo_mqtt.nodes.base import Node, node_bus
from emo_mqtt.nodes.device import DeviceNode
from emo_mqtt.nodes.overlay import OverlayNode
from emo_mqtt.nodes.server import ServerNode
from emo_mqtt.topics import validate_id

log = logging.getLogger("emo_mqtt.nodes.standalone")


async def run_standalone(
    role: str,
    broker: str | BrokerURL,
    run: str,
    node_id: str,
    config_path: str,
    algorithm: str,
    out: Path | None,
) -> None:
    """Build the node ``role``/``node_id`` of ``run`` from the scenario file and run it."""
    validate_id(run, "run")
    config = load_config(config_path)
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"--algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    known = {"server": ["server"], "overlay": config.overlay_ids(), "device": config.device_ids()}
    if node_id not in known[role]:
        raise ConfigError(
            f"--id {node_id!r} is not a {role} of {config_path}: "
            f"use one of {', '.join(known[role])}"
        )
    if config.network.enabled:
        # The proxies live in `emo run`'s process; a standalone node uses its real network.
        log.warning(
            "%s: the [network] section is not applied by `emo node` (only `emo run` "
            "shapes links); this node uses the network it is on",
            config_path,
        )
    compute.configure(config.fleet.parallel_training)
    plan = plan_data(config)
    node: Node
    # The same layout as `emo run`: DIR/<algorithm>/..., so `emo infer DIR` finds it.
    where = None if out is None else out / algorithm
    # With --out, the server and overlays checkpoint there and resume after a restart.
    bus = node_bus(broker, run, role, node_id)
    if role == "server":
        node = ServerNode(
            bus,
            config,
            run,
            algorithm,
            plan,
            node_id=node_id,
            out_dir=where,
            checkpoint_dir=None if where is None else where / "checkpoint" / "server",
        )
    elif role == "overlay":
        node = OverlayNode(
            bus,
            config,
            run,
            node_id,
            spill_dir=None if where is None else where / "spill" / node_id,
            checkpoint_dir=None if where is None else where / "checkpoint" / node_id,
        )
    else:
        node = DeviceNode(bus, config, run, node_id, algorithm, plan.device(node_id))
    await node.run_node()
