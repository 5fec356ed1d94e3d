"""Run configuration: the scenario TOML file, validated into typed dataclasses.

Every node of a run reads the same configuration (``emo node ... --config FILE``), so the
data partition, the sampled devices and the models follow from the file and the seed
alone. Bad files are refused before anything starts, with the key and the problem named.
See ``scenarios/README.md`` for every key, its unit and its default.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from emo_mqtt.algorithms import Algorithm
from emo_mqtt.controller import ControllerConfig
from emo_mqtt.data import DATASETS, split_model_name
from emo_mqtt.errors import ConfigError, TopicError
from emo_mqtt.fedavg import AGGREGATORS
from emo_mqtt.netscenario import NetworkConfig, parse_network
from emo_mqtt.topics import validate_id

#: Every algorithm's name, in the order the docs list them.
ALGORITHMS = tuple(a.value for a in Algorithm)


@dataclass(frozen=True)
class RunSection:
    """``[run]``: what to run."""

    name: str = "run"
    #: The run's id on the broker (topics and client ids are rooted at ``<id>-<algorithm>``).
    #: Empty in a file: ``emo run`` picks ``<name>-<random suffix>`` at each start, so two
    #: runs of one scenario on one broker never share topics or sessions (``--run`` sets it).
    id: str = ""
    seed: int = 1
    rounds: int = 10
    algorithms: tuple[str, ...] = ("fl", "sfl", "emo")
    #: Accuracy (0..1) whose first crossing is reported as time to target.
    target_accuracy: float = 0.7


@dataclass(frozen=True)
class DataSection:
    """``[data]``: the dataset and how it is split across devices."""

    dataset: Literal["fashion-mnist", "cifar10"] = "fashion-mnist"
    #: Directory with the dataset's files; empty: $EMO_DATA_DIR or
    #: /usr/share/datasets/fashion-mnist for Fashion-MNIST, $EMO_CIFAR10_DIR for CIFAR-10.
    data_dir: str = ""
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = 0.3
    #: Label shards per device for ``partition = "shards"`` (FedAvg's pathological non-IID).
    shards_per_device: int = 2
    #: Fewest training samples any device may hold (a Dirichlet draw is rebalanced to it).
    min_samples_per_device: int = 10
    #: Per-device sample counts: equal-ish ("none") or drawn from a skewed distribution.
    size_skew: Literal["none", "lognormal", "powerlaw"] = "none"
    #: Sigma of the log-normal weights of ``size_skew = "lognormal"``.
    size_sigma: float = 1.0
    #: Pareto shape of ``size_skew = "powerlaw"`` (smaller: heavier tail).
    size_exponent: float = 1.5
    #: Training samples per device (0: the device's whole partition); the mean count per
    #: device under a size skew.
    samples_per_device: int = 1000
    #: Training samples held back by the server to fit ensemble weights.
    validation_samples: int = 2000
    #: Test samples evaluated after every round (the final evaluation uses all 10,000).
    eval_samples_per_round: int = 2000


#: Most devices a fleet may have (each holds its own MQTT connection).
MAX_DEVICES = 10_000


@dataclass(frozen=True)
class FleetSection:
    """``[fleet]``: how many nodes, and FedAvg's straggler policy."""

    devices: int = 8
    overlays: int = 2
    #: Share of devices sampled each round (at least one).
    sample_fraction: float = 1.0
    #: Updates needed to close a round once the deadline has passed.
    min_updates: int = 1
    #: Seconds after a round starts at which it closes with the updates it has.
    round_deadline_s: float = 120.0
    #: Device trainings allowed to run at the same time in one process (CPU cores).
    parallel_training: int = 2
    #: Updates whose distance to the round's global model exceeds this many times the
    #: global model's own L2 norm are refused (a diverged or forged update); 0 turns it off.
    max_update_norm_ratio: float = 10.0
    #: How the server combines a round's updates: "fedavg" (sample-weighted mean),
    #: "median" (coordinate-wise) or "trimmed_mean" (coordinate-wise, ``trim_fraction`` cut
    #: from each end): the last two are robust to a poisoned update (emo_mqtt/fedavg.py).
    aggregator: str = "fedavg"
    #: Share of the updates cut from each end of every coordinate by "trimmed_mean" (at
    #: least one update per end once a round has 3).
    trim_fraction: float = 0.1
    #: Device training speed relative to this machine (0.5: a round's training takes twice
    #: as long); per device in ``[network.nodes.<id>] compute_speed``.
    device_compute_speed: float = 1.0


@dataclass(frozen=True)
class FLSection:
    """``[fl]``: the device model and local training."""

    model: str = "cnn-small"
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0


@dataclass(frozen=True)
class SFLSection:
    """``[sfl]``: the SplitFed baselines.

    The server half is the scenario's overlay model (``emo.overlay_model``) stacked on the
    FL trunk: the large model SplitFed exists to train (see docs/algorithms.md).
    """

    #: SGD learning rate of the device half (the FL trunk).
    lr: float = 0.05
    #: Optimiser of the server half: "sgd" (plain SGD) or "adam".
    server_optimizer: Literal["sgd", "adam"] = "sgd"
    #: Learning rate of the server half (0: the same as ``lr``).
    server_lr: float = 0.0
    #: Seconds a device waits for the gradient of one batch before giving up the round.
    gradient_timeout_s: float = 60.0


@dataclass(frozen=True)
class EMOSection:
    """``[emo]``: overlays, their replay cache and the ensemble."""

    overlay_model: str = "overlay-mlp"
    scaling: Literal["horizontal", "vertical"] = "horizontal"
    overlay_lr: float = 0.01
    overlay_batch_size: int = 64
    #: Optimiser steps an overlay takes per FL round of activations it receives.
    overlay_steps_per_round: int = 150
    #: Replay cache capacity in entries (one entry = one sample's activations).
    cache_entries: int = 20_000
    #: Spill tier on disk, MiB (0: no spill tier).
    spill_mib: int = 64
    #: Activations older than this many FL rounds are not replayed.
    max_staleness: int = 3
    #: Device outbox bound, KiB.
    outbox_kib: int = 4096
    #: Whose activations an overlay replays: "own" (the devices it serves, the paper's
    #: partition of the fleet) or "fleet" (every device's: the broker fans each device's
    #: activations out to every overlay, so the overlays become diverse members trained on
    #: the same data from different initialisations, and more overlays add members instead
    #: of splitting the data; docs/algorithms.md section 7, "Horizontal scaling").
    replay_scope: Literal["own", "fleet"] = "own"


@dataclass(frozen=True)
class ControllerSection:
    """``[controller]``: the convergence-aware communication controller.

    Besides ``enabled`` and ``probe_samples``, the section takes any threshold of
    :class:`emo_mqtt.controller.ControllerConfig` (where each one is explained); those not
    given keep the controller's defaults. ``docs/algorithms.md`` argues the policy.
    """

    enabled: bool = True
    #: Validation samples on which the server measures trunk drift between rounds.
    probe_samples: int = 256
    #: ``emo_fixed`` (an ablation, no signals): share of every batch's samples published ...
    fixed_share: float = 0.5
    #: ... and at what precision (fp32, fp16 or int8).
    fixed_precision: Literal["fp32", "fp16", "int8"] = "int8"
    #: Thresholds given in the file, as (name, value) pairs.
    policy_overrides: tuple[tuple[str, Any], ...] = ()

    def policy(self) -> ControllerConfig:
        """The controller's own configuration (validated there)."""
        return ControllerConfig(**dict(self.policy_overrides))


def _controller_section(values: dict[str, Any]) -> ControllerSection:
    own = {f.name: f for f in fields(ControllerSection) if f.name != "policy_overrides"}
    policy_fields = {f.name for f in fields(ControllerConfig)}
    unknown = sorted(set(values) - set(own) - policy_fields)
    if unknown:
        raise ConfigError(
            f"[controller]: unknown key(s) {unknown}; known: {sorted(set(own) | policy_fields)}"
        )
    hints = get_type_hints(ControllerSection)
    kwargs = {k: _coerce(f"controller.{k}", v, hints[k]) for k, v in values.items() if k in own}
    overrides = []
    for k, v in values.items():
        if k in policy_fields:
            if isinstance(v, list):  # TOML arrays: the policy takes tuples
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            overrides.append((k, v))
    section = ControllerSection(**kwargs, policy_overrides=tuple(overrides))
    try:
        section.policy()
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"[controller]: {exc}") from None
    return section


@dataclass(frozen=True)
class RunConfig:
    """A whole scenario."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    fleet: FleetSection = field(default_factory=FleetSection)
    fl: FLSection = field(default_factory=FLSection)
    sfl: SFLSection = field(default_factory=SFLSection)
    emo: EMOSection = field(default_factory=EMOSection)
    controller: ControllerSection = field(default_factory=ControllerSection)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    source: str = ""

    # -- derived ----------------------------------------------------------------------------
    def device_ids(self) -> list[str]:
        return [f"dev{i:02d}" for i in range(self.fleet.devices)]

    def overlay_ids(self) -> list[str]:
        return [f"ovl{i}" for i in range(self.fleet.overlays)]

    def device_index(self, device: str) -> int:
        """The position of ``device`` in :meth:`device_ids` (ValueError: not a device here).

        Read from the id itself: a fleet of 10,000 devices looks devices up constantly,
        and a search of the list made that quadratic.
        """
        digits = device[3:]
        if device.startswith("dev") and digits.isascii() and digits.isdigit():
            index = int(digits)
            if index < self.fleet.devices and f"dev{index:02d}" == device:
                return index
        raise ValueError(f"{device!r} is not a device of this fleet")

    def overlay_of(self, device: str) -> str:
        """The overlay serving ``device``: devices are dealt to overlays in turn."""
        return f"ovl{self.device_index(device) % self.fleet.overlays}"

    def devices_of(self, overlay: str) -> list[str]:
        """The devices ``overlay`` serves (none for an id that is not an overlay's)."""
        overlays = self.overlay_ids()
        if overlay not in overlays:
            return []
        return self.device_ids()[overlays.index(overlay) :: self.fleet.overlays]

    def replays_of(self, overlay: str) -> list[str]:
        """The devices whose activations ``overlay`` caches and replays (``emo.replay_scope``)."""
        if self.emo.replay_scope == "fleet":
            return self.device_ids()
        return self.devices_of(overlay)

    def compute_speed(self, device: str) -> float:
        """``device``'s training speed relative to this machine."""
        return self.network.device_compute_speed(device, self.fleet.device_compute_speed)

    def with_overrides(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some keys replaced, e.g. ``with_overrides(run={"rounds": 2})``."""
        raw = self._raw()
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return from_dict(raw, self.source)

    def _raw(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw.pop("source")
        raw["network"] = copy.deepcopy(self.network.raw)
        controller = raw["controller"]
        controller.update(dict(controller.pop("policy_overrides")))
        return raw

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration, controller thresholds included (JSON-ready)."""
        raw = self._raw()
        raw["controller"].update(dataclasses.asdict(self.controller.policy()))
        return raw


_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "fleet": FleetSection,
    "fl": FLSection,
    "sfl": SFLSection,
    "emo": EMOSection,
    "controller": ControllerSection,
}
#: Sections parsed by their own module rather than as flat tables of keys.
_OTHER_SECTIONS = ("network",)


def _coerce(where: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            choices = ", ".join(repr(c) for c in get_args(hint))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")  # pragma: no cover


def from_dict(raw: dict[str, Any], source: str = "") -> RunConfig:
    """Validate a parsed TOML document into a :class:`RunConfig` (ConfigError names the key)."""
    unknown = sorted(set(raw) - set(_SECTIONS) - set(_OTHER_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source or 'config'}: unknown section(s) {unknown}; "
            f"known: {sorted([*_SECTIONS, *_OTHER_SECTIONS])}"
        )
    built: dict[str, Any] = {}
    for name, section_type in _SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table")
        if name == "controller":
            built[name] = _controller_section(values)
            continue
        hints = get_type_hints(section_type)
        known = {f.name for f in fields(section_type)}
        extra = sorted(set(values) - known)
        if extra:
            raise ConfigError(f"[{name}]: unknown key(s) {extra}; known: {sorted(known)}")
        kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
        built[name] = section_type(**kwargs)
    config = RunConfig(**built, source=source)
    _check(config)
    # Trace files are named relative to the scenario file.
    base_dir = Path(source).parent if source else Path.cwd()
    network = parse_network(raw.get("network"), base_dir, config.device_ids(), config.overlay_ids())
    return dataclasses.replace(config, network=network)


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def _check(c: RunConfig) -> None:
    try:
        validate_id(c.run.name, "run.name")
        if c.run.id:
            # The longest algorithm name must still fit in an id with it.
            validate_id(f"{c.run.id}-emo-all", "run.id")
    except TopicError as exc:
        raise ConfigError(str(exc)) from None
    _require(c.run.rounds >= 1, "run.rounds", "must be at least 1")
    _require(len(c.run.algorithms) > 0, "run.algorithms", "list at least one algorithm")
    for algo in c.run.algorithms:
        _require(algo in ALGORITHMS, "run.algorithms", f"unknown {algo!r}; known: {ALGORITHMS}")
    _require(len(set(c.run.algorithms)) == len(c.run.algorithms), "run.algorithms", "duplicates")
    _require(0 < c.run.target_accuracy <= 1, "run.target_accuracy", "must be in (0, 1]")
    _check_data(c)
    # One MQTT connection per device: past 10,000 a single broker and box are the limit
    # long before the config is (docs/performance.md); the data check below comes first.
    _require(1 <= c.fleet.devices <= MAX_DEVICES, "fleet.devices", f"must be 1..{MAX_DEVICES:,}")
    _require(c.fleet.overlays >= 1, "fleet.overlays", "must be at least 1")
    _require(c.fleet.overlays <= c.fleet.devices, "fleet.overlays", "cannot exceed fleet.devices")
    _require(0 < c.fleet.sample_fraction <= 1, "fleet.sample_fraction", "must be in (0, 1]")
    _require(c.fleet.min_updates >= 1, "fleet.min_updates", "must be at least 1")
    _require(c.fleet.round_deadline_s > 0, "fleet.round_deadline_s", "must be > 0")
    _require(
        c.fleet.max_update_norm_ratio >= 0,
        "fleet.max_update_norm_ratio",
        "must be >= 0 (0: no norm bound)",
    )
    _require(
        c.fleet.aggregator in AGGREGATORS,
        "fleet.aggregator",
        f"unknown {c.fleet.aggregator!r}; known: {list(AGGREGATORS)}",
    )
    _require(0 <= c.fleet.trim_fraction < 0.5, "fleet.trim_fraction", "must be in [0, 0.5)")
    _require(c.fleet.parallel_training >= 1, "fleet.parallel_training", "must be at least 1")
    _require(c.fleet.device_compute_speed > 0, "fleet.device_compute_speed", "must be > 0")
    _require(c.fl.local_epochs >= 1, "fl.local_epochs", "must be at least 1")
    _require(c.fl.batch_size >= 1, "fl.batch_size", "must be at least 1")
    _require(c.fl.lr > 0, "fl.lr", "must be > 0")
    _require(c.sfl.lr > 0, "sfl.lr", "must be > 0")
    _require(c.sfl.server_lr >= 0, "sfl.server_lr", "must be >= 0 (0: the same as sfl.lr)")
    _require(c.emo.overlay_lr > 0, "emo.overlay_lr", "must be > 0")
    _require(
        c.emo.cache_entries >= c.emo.overlay_batch_size,
        "emo.cache_entries",
        "must hold at least one overlay batch",
    )
    _require(c.emo.max_staleness >= 0, "emo.max_staleness", "must be >= 0")
    _require(c.emo.overlay_steps_per_round >= 0, "emo.overlay_steps_per_round", "must be >= 0")
    _require(c.controller.probe_samples >= 1, "controller.probe_samples", "must be at least 1")
    _require(0 < c.controller.fixed_share <= 1, "controller.fixed_share", "must be in (0, 1]")


def _check_data(c: RunConfig) -> None:
    d = c.data
    _require(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    _require(
        d.shards_per_device >= 1,
        "data.shards_per_device",
        f"must be at least 1, got {d.shards_per_device}",
    )
    _require(
        d.min_samples_per_device >= 1,
        "data.min_samples_per_device",
        f"must be at least 1, got {d.min_samples_per_device}",
    )
    _require(d.size_sigma > 0, "data.size_sigma", f"must be > 0, got {d.size_sigma}")
    _require(d.size_exponent > 0, "data.size_exponent", f"must be > 0, got {d.size_exponent}")
    _require(
        d.samples_per_device >= 0,
        "data.samples_per_device",
        f"must be >= 0, got {d.samples_per_device}",
    )
    _require(
        d.samples_per_device == 0 or d.samples_per_device >= d.min_samples_per_device,
        "data.samples_per_device",
        f"{d.samples_per_device} is below "
        f"data.min_samples_per_device {d.min_samples_per_device} (0: no cap)",
    )
    _require(
        d.validation_samples >= 100,
        "data.validation_samples",
        f"must be >= 100, got {d.validation_samples}",
    )
    _require(
        d.eval_samples_per_round >= 100,
        "data.eval_samples_per_round",
        f"must be >= 100, got {d.eval_samples_per_round}",
    )
    info = DATASETS[d.dataset]
    try:
        model, shape = split_model_name(c.fl.model)
    except ConfigError as exc:
        raise ConfigError(f"fl.model: {exc}") from exc
    if shape != info.input_shape:
        want = "x".join(map(str, info.input_shape))
        fix = model if info.input_shape == split_model_name(model)[1] else f"{model}@{want}"
        raise ConfigError(
            f"fl.model {c.fl.model!r} takes {'x'.join(map(str, shape))} images but "
            f'data.dataset {d.dataset!r} has {want}: use fl.model = "{fix}"'
        )
    # The standard release's size: a fleet that cannot fit even there is refused now, before
    # any file is read (the data plan checks the copy actually read again).
    pool = info.train_samples - d.validation_samples
    _require(
        pool > 0,
        "data.validation_samples",
        f"{d.validation_samples} leaves no training data ({d.dataset} holds "
        f"{info.train_samples} training samples)",
    )
    devices, minimum = c.fleet.devices, d.min_samples_per_device
    _require(
        pool >= devices * minimum,
        "fleet.devices",
        f"fleet too large for the data: {devices} devices x data.min_samples_per_device "
        f"{minimum} needs {devices * minimum} training samples, but {d.dataset} has "
        f"{pool} ({info.train_samples} minus data.validation_samples "
        f"{d.validation_samples}); use fewer devices or a lower minimum",
    )
    if d.partition == "shards" and devices >= 1:
        shard = pool // (devices * d.shards_per_device)
        _require(
            shard * d.shards_per_device >= minimum,
            "data.shards_per_device",
            f"{devices} devices x {d.shards_per_device} shards of {pool} training samples "
            f"give shards of {shard} samples, a device {shard * d.shards_per_device}: "
            f"below data.min_samples_per_device {minimum}",
        )


def scenario_dir() -> Path:
    """Where the shipped scenarios live (in the package: ``emo_mqtt.scenarios``)."""
    return Path(__file__).resolve().parent / "scenarios"


def shipped_scenarios() -> dict[str, Path]:
    """The shipped scenarios by name (``quickstart``: ``.../scenarios/quickstart.toml``)."""
    return {p.stem: p for p in sorted(scenario_dir().glob("*.toml"))}


def describe_scenario(path: Path) -> str:
    """The first sentence of a scenario file's leading comment (``emo scenarios``)."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        words.extend(line.lstrip("#").split())
        text = " ".join(words)
        end = text.find(". ")
        if end >= 0 or text.endswith("."):
            return text[: end + 1] if end >= 0 else text
    return " ".join(words)


def find_scenario(name_or_path: str | Path) -> Path:
    """A scenario file: a path, or the name of a shipped one (``quickstart``, from anywhere)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = shipped_scenarios()
    name = p.name.removesuffix(".toml")
    if name in shipped and (len(p.parts) == 1 or p.parent.name == "scenarios"):
        return shipped[name]
    raise ConfigError(
        f"scenario file not found: {p} (shipped scenarios, usable by name: "
        f"{', '.join(shipped)}; `emo scenarios` describes them)"
    )


def parse_setting(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (``emo run --set``) as (section, key, value).

    The value is read as a TOML value (``2``, ``0.5``, ``true``, ``["fl", "emo"]``,
    ``"text"``); anything that is not one is taken as a string (``data.partition=iid``).
    Types are then checked like the file's (:func:`from_dict`).
    """
    where, sep, value = text.partition("=")
    section, dot, key = where.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. run.rounds=2")
    try:
        parsed: Any = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return section, key, parsed


def with_settings(config: RunConfig, settings: list[str]) -> RunConfig:
    """``config`` with ``--set section.key=value`` overrides, validated like the file."""
    sections: dict[str, dict[str, Any]] = {}
    for text in settings:
        section, key, value = parse_setting(text)
        if section not in _SECTIONS and section != "network":
            raise ConfigError(
                f"--set {text!r}: no section [{section}]; known: "
                f"{', '.join([*_SECTIONS, 'network'])}"
            )
        sections.setdefault(section, {})[key] = value
    return config.with_overrides(**sections) if sections else config


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a scenario file (or a shipped scenario, by name)."""
    p = find_scenario(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"scenario file not found: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read scenario file {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    return from_dict(raw, str(p))
