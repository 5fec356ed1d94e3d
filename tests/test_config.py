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
    assert c.controller.policy().max_fraction == 1.0
    tuned = from_dict({"controller": {"max_fraction": 0.5, "enabled": False}})
    assert tuned.controller.policy().max_fraction == 0.5 and not tuned.controller.enabled
    assert tuned.to_dict()["controller"]["max_fraction"] == 0.5


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
