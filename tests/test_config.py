"""Scenario files: defaults, validation with clear messages, overrides, the fleet layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from emo_mqtt.config import RunConfig, from_dict, load_config
from emo_mqtt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_scenarios_load() -> None:
    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        config = load_config(path)
        assert config.run.rounds >= 1
        assert config.source == str(path)


def test_defaults_and_layout() -> None:
    c = from_dict({"fleet": {"devices": 5, "overlays": 2}})
    assert c.device_ids() == ["dev00", "dev01", "dev02", "dev03", "dev04"]
    assert c.overlay_ids() == ["ovl0", "ovl1"]
    assert c.devices_of("ovl0") == ["dev00", "dev02", "dev04"]
    assert c.overlay_of("dev03") == "ovl1"
    assert c.controller.policy().max_fraction == 0.5
    tuned = from_dict({"controller": {"max_fraction": 0.8, "enabled": False}})
    assert tuned.controller.policy().max_fraction == 0.8 and not tuned.controller.enabled
    assert tuned.to_dict()["controller"]["max_fraction"] == 0.8


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"runn": {}}, "unknown section"),
        ({"run": {"rounds": 0}}, "run.rounds"),
        ({"run": {"rounds": "ten"}}, "run.rounds: expected an integer"),
        ({"run": {"algorithms": ["fl", "fedprox"]}}, "unknown 'fedprox'"),
        ({"run": {"name": "bad name"}}, "run.name"),
        ({"data": {"partition": "pathological"}}, "data.partition"),
        ({"data": {"alpha": 0}}, "data.alpha"),
        ({"fleet": {"devices": 2, "overlays": 3}}, "fleet.overlays"),
        ({"fleet": {"sample_fraction": 1.5}}, "fleet.sample_fraction"),
        ({"fl": {"lr": -1}}, "fl.lr"),
        ({"fl": {"colour": "red"}}, "unknown key(s) ['colour']"),
        ({"emo": {"cache_entries": 1}}, "emo.cache_entries"),
        ({"controller": {"min_fraction": 0.9, "max_fraction": 0.5}}, "[controller]"),
        ({"controller": {"enabled": "yes"}}, "controller.enabled: expected true or false"),
        ({"controller": {"speed": 3}}, "unknown key(s) ['speed']"),
        ({"run": []}, "[run] must be a table"),
    ],
)
def test_bad_values_are_named(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert message in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_overrides_are_validated_too() -> None:
    c = RunConfig()
    assert c.with_overrides(run={"rounds": 3}).run.rounds == 3
    with pytest.raises(ConfigError, match=r"run\.rounds"):
        c.with_overrides(run={"rounds": -1})


def test_scenarios_readme_documents_every_key() -> None:
    from dataclasses import fields

    from emo_mqtt.config import _SECTIONS

    text = (ROOT / "scenarios" / "README.md").read_text()
    for section, cls in _SECTIONS.items():
        assert f"## `[{section}]`" in text, section
        for f in fields(cls):
            if f.name != "policy_overrides":
                assert f"| `{f.name}` |" in text, f"{section}.{f.name} is not documented"


def _known_keys(network: dict[str, object]) -> list[str]:
    """The keys a part of ``[network]`` accepts, as its unknown-key error lists them."""
    import ast

    with pytest.raises(ConfigError) as err:
        from_dict({"network": network})
    message = str(err.value)
    assert "known: " in message, message
    return list(ast.literal_eval(message.split("known: ", 1)[1]))


def test_scenarios_readme_documents_every_network_key() -> None:
    from emo_mqtt.netscenario import ACTIONS, LINK_CLASSES, LINK_KEYS, TRACE_COLUMNS

    text = (ROOT / "scenarios" / "README.md").read_text()
    assert "## `[network]`" in text
    network = text.split("## `[network]`", 1)[1]
    top = _known_keys({"zzz": 1})
    event = _known_keys({"events": [{"at_s": 0, "target": "dev00", "action": "up", "zzz": 1}]})
    duty = _known_keys({"duty_cycle": [{"zzz": 1}]})
    availability = _known_keys({"availability": {"zzz": 1}})
    node = _known_keys({"nodes": {"dev00": {"zzz": 1}}})
    assert set(LINK_KEYS) < set(node) and set(LINK_CLASSES) < set(top)
    for key in [*top, *duty, *availability, *node]:
        if key in LINK_CLASSES:
            assert f"`{key}`" in network, f"network.{key} is not documented"
        else:
            assert f"| `{key}` |" in network, f"network key {key} is not documented"
    for key in event:
        assert f"`{key}`" in network, f"network.events key {key} is not documented"
    for column in TRACE_COLUMNS:
        assert f"`{column}`" in network.split("### CSV trace", 1)[1], f"trace column {column}"
    for action in ACTIONS:
        assert f"`{action}`" in network, f"action {action}"
    for section in (
        "### Link classes",
        "### Events",
        "### CSV trace",
        "### Duty cycles",
        "### FedScale availability",
        "### Compute speed",
    ):
        assert section in network, section
    fleet = text.split("## `[fleet]`", 1)[1].split("\n## ", 1)[0]
    assert "| `device_compute_speed` |" in fleet
    assert "time_to_target_s" in text and "wall_to_target_s" not in text
    for scenario in (ROOT / "scenarios").glob("*.toml"):
        assert f"`{scenario.name}`" in text, f"{scenario.name} is not listed"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"data": {"partition": "shards", "shards_per_device": 0}},
            "data.shards_per_device: must be at least 1, got 0",
        ),
        (
            {"data": {"min_samples_per_device": 0}},
            "data.min_samples_per_device: must be at least 1",
        ),
        ({"data": {"size_skew": "zipf"}}, "data.size_skew: 'zipf' is not one of"),
        ({"data": {"size_sigma": -1}}, "data.size_sigma: must be > 0, got -1.0"),
        ({"data": {"size_exponent": 0}}, "data.size_exponent: must be > 0"),
        (
            {"data": {"samples_per_device": 5}},
            "data.samples_per_device: 5 is below data.min_samples_per_device 10",
        ),
        ({"data": {"dataset": "cifar100"}}, "data.dataset: 'cifar100' is not one of"),
        (
            {"data": {"dataset": "cifar10"}},
            "fl.model 'cnn-small' takes 1x28x28 images but data.dataset 'cifar10' has 3x32x32: "
            'use fl.model = "cnn-small@3x32x32"',
        ),
        ({"fl": {"model": "mlp-small@3x32x32"}}, 'use fl.model = "mlp-small"'),
        ({"fl": {"model": "cnn-small@3x32"}}, "fl.model: model 'cnn-small@3x32'"),
        ({"data": {"validation_samples": 60_000}}, "data.validation_samples: 60000 leaves no"),
        (
            {
                "fleet": {"devices": 10, "overlays": 2},
                "data": {
                    "partition": "shards",
                    "shards_per_device": 3,
                    "min_samples_per_device": 5800,
                    "samples_per_device": 0,
                },
            },
            "give shards of 1933 samples, a device 5799: below data.min_samples_per_device 5800",
        ),
    ],
)
def test_bad_data_values_are_named(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert message in str(err.value)


def test_fleet_too_large_for_the_data_is_refused_naming_the_numbers() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(
            {
                "fleet": {"devices": 1000},
                "data": {"min_samples_per_device": 100, "validation_samples": 2000},
            }
        )
    text = str(err.value)
    for number in (
        "1000 devices",
        "data.min_samples_per_device 100",
        "100000 training samples",
        "fashion-mnist has 58000",
        "60000 minus data.validation_samples 2000",
    ):
        assert number in text, text
    # The same fleet with a minimum the data holds is accepted; CIFAR-10 holds fewer.
    assert (
        from_dict(
            {"fleet": {"devices": 1000}, "data": {"min_samples_per_device": 58}}
        ).data.min_samples_per_device
        == 58
    )
    with pytest.raises(ConfigError, match="cifar10 has 48000"):
        from_dict(
            {
                "fleet": {"devices": 1000},
                "fl": {"model": "cnn-small@3x32x32"},
                "data": {"dataset": "cifar10", "min_samples_per_device": 49},
            }
        )


def test_new_data_keys_are_read() -> None:
    c = from_dict(
        {
            "data": {
                "partition": "shards",
                "shards_per_device": 3,
                "size_skew": "powerlaw",
                "size_exponent": 2.5,
                "size_sigma": 0.5,
                "min_samples_per_device": 20,
            }
        }
    )
    assert (c.data.partition, c.data.shards_per_device, c.data.size_skew) == (
        "shards",
        3,
        "powerlaw",
    )
    assert c.data.size_exponent == 2.5 and c.data.size_sigma == 0.5
    assert c.data.min_samples_per_device == 20
    assert c.to_dict()["data"]["size_skew"] == "powerlaw"
