"""The attacker suite of issue 11 (item 8): whole runs against a real Mosquitto under attack.

An attacker holding one device's identity (and, for the overlay model, one overlay's)
publishes only on topics that identity may write, during a real small fleet run started by
``emo run`` (``cli.main``) against a Mosquitto of the test's own: updates with
``round = inf`` and ``2**63``, zeros claiming ``10**15`` samples, statuses nested 5,000
deep (live, and retained before the run starts), ``[1]`` on the device's metrics topic
(live and retained), a flood of chunk headers declaring 256 MiB each, activations with
``round = 2**63`` and ``labels = 1000``, an overlay model full of NaN, SplitFed batches of
the wrong shape and of NaN. Every run must finish all its rounds with exit status 0, count
every refusal by kind and reason in ``summary.json``'s ``rejected``, keep the FL model
bit-identical to the clean run of the same seed, and keep EMO's accuracy within noise.

Zeros with an honest sample count are a valid-looking update that no validation can refuse:
they are bounded by the aggregation instead (see :func:`test_zeros_with_an_honest_count`).

A representative subset runs again over the provisioned TLS broker with its ACLs, where the
attacker is the compromised device itself (its own connection: the broker binds one
connection to each identity).

No sleeps: the server holds round 1 open until every attack of the run has been counted
where it must be (a condition, with a generous timeout that only turns a hang into a
failure), so the counts cannot depend on timing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Fleet
from test_hostile import _tiny_chunk

from emo_mqtt import fleet as fleet_module
from emo_mqtt.algorithms import Algorithm
from emo_mqtt.broker.launch import BrokerHandle
from emo_mqtt.bus.mqtt import MqttBus
from emo_mqtt.cli import main
from emo_mqtt.codec import encode
from emo_mqtt.config import RunConfig, load_config
from emo_mqtt.dataplan import DataPlan, plan_data
from emo_mqtt.messages import Limits, Update
from emo_mqtt.nodes.base import Node
from emo_mqtt.nodes.limits import limits_for
from emo_mqtt.nodes.server import ServerNode
from emo_mqtt.topics import Kind, topic

pytestmark = pytest.mark.broker

TIMEOUT_S = 90.0  # generous: a deadline here only turns a hang into a failure

_SCENARIO = """
[run]
name = "{name}"
rounds = 2
[data]
samples_per_device = 150
validation_samples = 300
eval_samples_per_round = 300
[fleet]
devices = {devices}
overlays = 1
round_deadline_s = 60
aggregator = "{aggregator}"
trim_fraction = 0.25
[emo]
overlay_steps_per_round = 10
"""

DEEP = ("[" * 5000 + "]" * 5000).encode()
#: Chunk frames declaring 256 MiB each: refused at their header, nothing allocated.
FLOOD = 50
#: EMO accuracy of an attacked run may differ from the clean run's by this much: overlays
#: train asynchronously, so EMO is not bit-reproducible (the FL model is).
EMO_NOISE = 0.1


def write_scenario(where: Path, name: str, devices: int = 4, aggregator: str = "fedavg") -> Path:
    path = where / f"{name}.toml"
    path.write_text(_SCENARIO.format(name=name, devices=devices, aggregator=aggregator))
    return path


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread (tiny models: faster and steadier on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


async def until(condition: Callable[[], bool], what: Callable[[], str]) -> None:
    """Wait for a condition that no event announces (counters of several nodes)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {TIMEOUT_S} s waiting for {what()}")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------ attacks

#: What an attack publishes, given the run id: (topic, payload, retain).
Publishes = Callable[[str], list[tuple[str, bytes, bool]]]


@dataclass
class Attack:
    """One attacked run: what is published before it starts (retained), what is published
    once round 1 is announced, and where each refusal must be counted before round 1 may
    close: ``{node id: {"<kind>:<reason>": at least}}``."""

    before: Publishes = lambda run: []
    during: Publishes = lambda run: []
    expect: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Changes a node as it is built (a compromised device's firmware).
    compromise: Callable[[Node], None] | None = None
    #: Filled while the run goes: the nodes by id, and the monitor.
    nodes: dict[str, Node] = field(default_factory=dict)
    monitors: list[Any] = field(default_factory=list)

    def counted(self) -> bool:
        return all(
            node in self.nodes and self.nodes[node].bus.stats.rejected.get(reason, 0) >= n
            for node, want in self.expect.items()
            for reason, n in want.items()
        )

    def seen(self) -> str:
        return str({n: dict(self.nodes[n].bus.stats.rejected) for n in self.expect if n in self})

    def __contains__(self, node: str) -> bool:
        return node in self.nodes


def frame(body: dict[str, Any], kind: str, sender: str, run: str, seq: int) -> bytes:
    return encode(body, kind=kind, sender=sender, run=run, seq=seq)


def zeros_of(spec: Any) -> dict[str, np.ndarray]:
    return {k: np.zeros(shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}


def fl_attacks(limits: Limits) -> Publishes:
    """As dev00: bad updates, deep status, ``[1]`` metrics, a chunk-header flood."""
    zeros = zeros_of(limits.round_weights)

    def publishes(run: str) -> list[tuple[str, bytes, bool]]:
        update = topic(Kind.DEVICE_UPDATE, run, node="dev00")
        bodies = [
            {"round": float("inf"), "weights": zeros, "samples": 10, "loss": 0.1},
            {"round": 2**63, "weights": zeros, "samples": 10, "loss": 0.1},
            {"round": 1, "weights": zeros, "samples": 10**15, "loss": 0.1},
        ]
        out = [
            (update, frame(b, "update", "dev00", run, 10_000 + i), False)
            for i, b in enumerate(bodies)
        ]
        out.append((topic(Kind.STATUS, run, node="dev00", role="device"), DEEP, False))
        out.append((topic(Kind.METRICS, run, node="dev00", role="device"), b"[1]", False))
        out += [(update, _tiny_chunk(n, 256 * 2**20, offset=n * 4096), False) for n in range(FLOOD)]
        return out

    return publishes


def retained_junk(run: str) -> list[tuple[str, bytes, bool]]:
    """Retained before the run starts, on dev00's status and metrics topics."""
    return [
        (topic(Kind.STATUS, run, node="dev00", role="device"), DEEP, True),
        (topic(Kind.METRICS, run, node="dev00", role="device"), b"[1]", True),
    ]


FL_EXPECT = {
    "server": {
        "update:bad_type": 1,  # round = inf
        "update:out_of_range": 2,  # round = 2**63, samples = 10**15
        "bad_json": 1,  # the live deep status (the retained one too, if it came first)
        "chunk_budget": FLOOD,
    }
}


def emo_attacks(limits: Limits) -> Publishes:
    """As dev00 and as ovl0: bad activations, an overlay model full of NaN."""
    assert limits.overlay_weights is not None and limits.activation_shape is not None
    nan = {
        k: np.full(shape, np.nan, np.dtype(dtype))
        if np.dtype(dtype).kind == "f"
        else np.zeros(shape, np.dtype(dtype))
        for k, (shape, dtype) in limits.overlay_weights.items()
    }
    n = 64
    good = {
        "sample_ids": np.arange(n),
        "labels": np.arange(n) % 10,
        "data": np.ones((n, *limits.activation_shape), np.float32),
        "scale": None,
        "last": False,
    }

    def publishes(run: str) -> list[tuple[str, bytes, bool]]:
        acts = topic(Kind.DEVICE_ACTIVATIONS, run, node="dev00")
        model = {"round": 1, "version": 99, "weights": nan, "loss": 0.5, "entries": 1}
        return [
            (
                topic(Kind.OVERLAY_MODEL, run, node="ovl0"),
                frame(model, "overlay.model", "ovl0", run, 40_000),
                False,
            ),
            (acts, frame({**good, "round": 2**63}, "activations", "dev00", run, 40_001), False),
            (
                acts,
                frame(
                    {**good, "round": 1, "labels": np.full(n, 1000)},
                    "activations",
                    "dev00",
                    run,
                    40_002,
                ),
                False,
            ),
        ]

    return publishes


EMO_EXPECT = {
    "server": {**FL_EXPECT["server"], "overlay.model:non_finite": 1},
    "ovl0": {"activations:out_of_range": 2},
}


def sfl_attacks(limits: Limits) -> Publishes:
    shape = limits.activation_shape
    assert shape is not None

    def publishes(run: str) -> list[tuple[str, bytes, bool]]:
        where = topic(Kind.DEVICE_SFL_ACTIVATIONS, run, node="dev00")
        labels = np.zeros(4, np.int64)
        bodies = [
            {"round": 1, "batch": 0, "activations": np.ones((4, 3), np.float32), "labels": labels},
            {
                "round": 1,
                "batch": 0,
                "activations": np.full((4, *shape), np.nan, np.float32),
                "labels": labels,
            },
            {
                "round": 2**63,
                "batch": 0,
                "activations": np.ones((4, *shape), np.float32),
                "labels": labels,
            },
        ]
        return [
            (where, frame(b, "sfl.activations", "dev00", run, 30_000 + i), False)
            for i, b in enumerate(bodies)
        ]

    return publishes


SFL_EXPECT = {
    "server": {
        "sfl.activations:bad_shape": 1,
        "sfl.activations:non_finite": 1,
        "sfl.activations:out_of_range": 1,
    }
}


def combine(*parts: Publishes) -> Publishes:
    return lambda run: [p for part in parts for p in part(run)]


# ------------------------------------------------------------------------------ runs


@contextmanager
def attacked(url: str, attack: Attack) -> Iterator[None]:
    """Patch the fleet so that ``attack`` happens during the next ``emo run``.

    Before the run's nodes start (right after ``reset_run`` cleared the run's retained
    topics), the attacker connects with a client id of its own and publishes ``before``
    retained; once round 1 is announced (the server enters its collection) it publishes
    ``during``, and the server waits for every refusal in ``expect`` to be counted.
    """
    original_reset, original_build = fleet_module.reset_run, fleet_module.build_node
    original_monitor = fleet_module.Monitor
    attackers: list[MqttBus] = []
    #: Retained topics the attack planted: cleared afterwards, so that the session's broker
    #: holds no junk for later tests (a dashboard test counts every retained message).
    planted: list[str] = []

    async def reset(broker: Any, config: RunConfig, algorithm: str) -> None:
        await original_reset(broker, config, algorithm)
        attack.nodes.clear()
        run = fleet_module.run_id(config, algorithm)
        bus = MqttBus(url, f"{run}-attacker", clean_start=True)
        await bus.__aenter__()
        attackers.append(bus)
        for where, payload, retain in attack.before(run):
            await bus.publish(where, payload, retain=retain)
            if retain:
                planted.append(where)

    def build(broker: Any, config: RunConfig, algorithm: str, *args: Any, **kw: Any) -> Node:
        node = original_build(broker, config, algorithm, *args, **kw)
        attack.nodes[node.node_id] = node
        if attack.compromise is not None:
            attack.compromise(node)
        if isinstance(node, ServerNode):
            collect = node.collect_round
            run = node.run

            async def gated(collector: Any) -> Any:
                if collector.round == 1:
                    for where, payload, retain in attack.during(run):
                        await attackers[-1].publish(where, payload, retain=retain)
                    await until(attack.counted, attack.seen)
                    # The attacker is done: its connection goes before the run's end.
                    await attackers.pop().__aexit__(None, None, None)
                return await collect(collector)

            node.collect_round = gated  # type: ignore[method-assign]
        return node

    class RecordingMonitor(original_monitor):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            attack.monitors.append(self)

    async def clear() -> None:
        async with MqttBus(url, "attacks-cleaner", clean_start=True) as bus:
            for where in planted:
                await bus.publish(where, b"", retain=True)  # an empty payload clears it

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fleet_module, "reset_run", reset)
        mp.setattr(fleet_module, "build_node", build)
        mp.setattr(fleet_module, "Monitor", RecordingMonitor)
        try:
            yield
        finally:
            asyncio.run(clear())


def emo_run(
    url: str, scenario: Path, algorithms: str, out: Path, attack: Attack | None = None
) -> dict[str, dict[str, Any]]:
    """``emo run`` (exit status 0 asserted); its summary.json's entries by algorithm."""
    args = ["run", str(scenario), "--broker", url, "--algorithms", algorithms]
    args += ["--out", str(out), "--quiet", "--json"]
    with one_thread():
        if attack is None:
            rc = main(args)
        else:
            with attacked(url, attack):
                rc = main(args)
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    entries: dict[str, dict[str, Any]] = summary["algorithms"]
    return entries


@dataclass(frozen=True)
class Setting:
    config: RunConfig
    plan: DataPlan
    scenario: Path
    clean: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def setting(mosquitto: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Setting:
    """The scenario, and one clean run of it (fl, emo, sfl_v1) shared by the module."""
    where = tmp_path_factory.mktemp("attacks")
    scenario = write_scenario(where, "attacks")
    config = load_config(scenario)
    clean = emo_run(mosquitto.url, scenario, "fl,emo,sfl_v1", where / "clean")
    for name, entry in clean.items():
        assert entry["rounds"] == 2 and entry["rejected"] == {}, (name, entry["rejected"])
    return Setting(config, plan_data(config), scenario, clean)


def check_finished(entry: dict[str, Any], rounds: int = 2) -> None:
    assert entry["rounds"] == rounds
    assert [r for r in entry["accuracy_per_round"] if r is None] == []


# ------------------------------------------------------------------------------ plain TCP


def test_fl_and_emo_under_attack(mosquitto: BrokerHandle, setting: Setting, tmp_path: Path) -> None:
    c, plan = setting.config, setting.plan
    attack = Attack(
        before=retained_junk,
        during=combine(
            fl_attacks(limits_for(c, Algorithm.FL, plan)),
            lambda run: (
                emo_attacks(limits_for(c, Algorithm.EMO, plan))(run) if run.endswith("-emo") else []
            ),
        ),
    )
    entries: dict[str, dict[str, Any]] = {}
    for algorithm, expect in (("fl", FL_EXPECT), ("emo", EMO_EXPECT)):
        attack.expect = expect
        attack.monitors.clear()
        entries.update(
            emo_run(mosquitto.url, setting.scenario, algorithm, tmp_path / algorithm, attack)
        )
        # emo run's monitor took the retained [1] (and the live one) as not ours.
        assert attack.monitors and attack.monitors[-1].skipped["not_object"] >= 1
    for algorithm, expect in (("fl", FL_EXPECT), ("emo", EMO_EXPECT)):
        entry, clean = entries[algorithm], setting.clean[algorithm]
        print(algorithm, "rejected:", entry["rejected"], "accuracy:", entry["accuracy"], end=" ")
        print("clean:", clean["accuracy"], "sha256:", entry["fl_model_sha256"])
        check_finished(entry)
        rejected = entry["rejected"]
        for reasons in expect.values():
            for reason, n in reasons.items():
                assert rejected.get(reason, 0) >= n, (algorithm, reason, rejected)
        # Refused updates never entered the average: FL is bit-identical.
        assert entry["fl_model_sha256"] == clean["fl_model_sha256"], algorithm
        assert entry["fl_accuracy"] == clean["fl_accuracy"]
    emo = entries["emo"]
    # The NaN model never entered the ensemble, and EMO is as good as unattacked.
    assert emo["poisoned_overlays"] == {"ovl0": 1}
    assert abs(emo["accuracy"] - setting.clean["emo"]["accuracy"]) <= EMO_NOISE, (
        emo["accuracy"],
        setting.clean["emo"]["accuracy"],
    )
    assert emo["accuracy"] > emo["fl_accuracy"] - EMO_NOISE


def test_splitfed_under_attack(mosquitto: BrokerHandle, setting: Setting, tmp_path: Path) -> None:
    """SplitFed V1 (a head per device, merged in device order: bit-reproducible over MQTT;
    V2's shared head takes batches in arrival order, so two clean V2 runs differ)."""
    limits = limits_for(setting.config, Algorithm.SFL_V1, setting.plan)
    attack = Attack(during=sfl_attacks(limits), expect=SFL_EXPECT)
    entry = emo_run(mosquitto.url, setting.scenario, "sfl_v1", tmp_path, attack)["sfl_v1"]
    check_finished(entry)
    for reason, n in SFL_EXPECT["server"].items():
        assert entry["rejected"].get(reason, 0) >= n, (reason, entry["rejected"])
    # No refused batch reached a head: the whole model (heads merged) is the clean run's.
    assert entry["fl_model_sha256"] == setting.clean["sfl_v1"]["fl_model_sha256"]
    with np.load(tmp_path / "sfl_v1" / "fl_model.npz") as saved:
        assert all(np.isfinite(saved[k]).all() for k in saved.files if saved[k].dtype.kind == "f")


def zeroing_firmware(node: Node) -> None:
    """dev00's firmware sends zeros with its honest sample count, every round."""
    if node.node_id != "dev00":
        return
    strategy: Any = getattr(node, "strategy")  # noqa: B009
    honest = strategy.update

    def update(r: int, model: torch.nn.Module, samples: int, loss: float) -> Update:
        sent: Update = honest(r, model, samples, loss)
        zeros = {k: np.zeros_like(v) for k, v in sent.weights.items()}
        poisoned = replace(sent, weights=zeros)
        strategy.last_update = poisoned
        return poisoned

    strategy.update = update


def test_zeros_with_an_honest_count(
    mosquitto: BrokerHandle, setting: Setting, tmp_path: Path
) -> None:
    """No validation can refuse zeros that claim the device's true count: what bounds them
    is the aggregation. FedAvg gives them their data share (1/4 here): the global model
    shrinks by a quarter each round, far from "replaced", and the norm reference keeps
    admitting honest updates. Trimmed mean (0.25 of 4: one value cut per end and coordinate)
    drops zeros wherever they are the extreme, so it stays near its own clean run."""
    runs: dict[str, dict[str, Any]] = {}
    for aggregator in ("fedavg", "trimmed_mean"):
        scenario = write_scenario(tmp_path, f"zeros-{aggregator}", aggregator=aggregator)
        for mode in ("clean", "attacked"):
            if aggregator == "fedavg" and mode == "clean":
                runs["fedavg-clean"] = setting.clean["fl"]
                continue
            attack = Attack(compromise=zeroing_firmware) if mode == "attacked" else None
            runs[f"{aggregator}-{mode}"] = emo_run(
                mosquitto.url, scenario, "fl", tmp_path / f"{aggregator}-{mode}", attack
            )["fl"]
    for name, entry in runs.items():
        check_finished(entry)
        # Zeros with an honest count are valid-looking: nothing refused them.
        assert entry["rejected"] == {}, (name, entry["rejected"])
    assert runs["fedavg-attacked"]["fl_model_sha256"] != runs["fedavg-clean"]["fl_model_sha256"]
    assert (
        runs["trimmed_mean-attacked"]["fl_model_sha256"]
        != runs["trimmed_mean-clean"]["fl_model_sha256"]
    )
    figures = {name: entry["fl_accuracy"] for name, entry in runs.items()}
    print("zeros with an honest count, FL test accuracy:", figures)
    # Bounded: neither aggregator lets one device of four wipe the model (an untrained
    # model scores ~0.1), and trimmed mean stays within noise of its clean run.
    assert figures["fedavg-attacked"] > 0.5 * figures["fedavg-clean"], figures
    assert figures["trimmed_mean-attacked"] >= figures["trimmed_mean-clean"] - EMO_NOISE, figures


# ------------------------------------------------------------------------------ TLS + ACLs


def tls_fl_run(
    fleet: Fleet, config: RunConfig, plan: DataPlan, attack: Attack | None
) -> ServerNode:
    """An FL run of the provisioned fleet, every node with its own identity; with
    ``attack``, dev00 is compromised: its own connection publishes the attack in round 1."""
    algorithm = "fl"

    def url(node_id: str) -> Any:
        user = "server-server" if node_id == "server" else f"device-{node_id}"
        return fleet.url(user)

    async def scenario() -> ServerNode:
        nodes = [
            fleet_module.build_node(url(n), config, algorithm, plan, n, None)
            for n in ["server", *config.device_ids()]
        ]
        server = nodes[0]
        assert isinstance(server, ServerNode)
        if attack is not None:
            attack.nodes.update({n.node_id: n for n in nodes})
            dev00 = attack.nodes["dev00"]
            collect = server.collect_round

            async def gated(collector: Any) -> Any:
                if collector.round == 1:
                    for where, payload, retain in attack.during(server.run):
                        await dev00.bus.publish(where, payload, retain=retain)
                    await until(attack.counted, attack.seen)
                return await collect(collector)

            server.collect_round = gated  # type: ignore[method-assign]
        tasks = [asyncio.create_task(n.run_node()) for n in nodes]
        try:
            await asyncio.wait_for(tasks[0], TIMEOUT_S * 2)
            await asyncio.wait_for(asyncio.gather(*tasks[1:]), TIMEOUT_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return server

    with one_thread():
        return asyncio.run(scenario())


def test_fl_under_attack_over_tls_with_acls(fleet: Fleet, tmp_path: Path) -> None:
    """The provisioned fleet (2 devices), dev00 compromised: the same refusals, the same
    FL model as the clean run over the same broker."""
    servers: dict[str, ServerNode] = {}
    for mode in ("clean", "attacked"):
        config = load_config(write_scenario(tmp_path, f"tls-{mode}", devices=2))
        plan = plan_data(config)
        attack = None
        if mode == "attacked":
            attack = Attack(during=fl_attacks(limits_for(config, Algorithm.FL, plan)))
            attack.expect = FL_EXPECT
        servers[mode] = tls_fl_run(fleet, config, plan, attack)
    clean, hit = servers["clean"], servers["attacked"]
    assert [h["round"] for h in hit.history] == [1, 2]
    assert all(h["updates"] == 2 and h["aggregated"] for h in hit.history)
    assert dict(clean.bus.stats.rejected) == {}
    for reason, n in FL_EXPECT["server"].items():
        assert hit.bus.stats.rejected.get(reason, 0) >= n, (reason, hit.bus.stats.rejected)
    # The scenario names differ (so do the run ids), the seed and the data do not.
    assert hit.final["fl_model_sha256"] == clean.final["fl_model_sha256"]
