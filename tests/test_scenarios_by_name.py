"""Shipped scenarios by name, ``emo scenarios`` and ``emo run --set`` (issue 14 item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emo_mqtt.cli import main
from emo_mqtt.config import (
    load_config,
    parse_setting,
    shipped_scenarios,
    with_settings,
)
from emo_mqtt.errors import ConfigError


def test_shipped_scenarios_load_by_name_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no scenarios/ here
    names = set(shipped_scenarios())
    assert {"quickstart", "paper", "wan_outage"} <= names
    assert load_config("quickstart").run.name == "quickstart"
    assert load_config("quickstart.toml").run.name == "quickstart"
    assert load_config("scenarios/wan_outage.toml").network.enabled  # traces found
    with pytest.raises(ConfigError, match="shipped scenarios, usable by name: ablation, cellular"):
        load_config("nope")


def test_a_local_file_wins_over_a_shipped_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text('[run]\nname = "mine"\n')
    assert load_config("quickstart").run.name == "mine"


def test_emo_scenarios_lists_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenarios"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(shipped_scenarios())
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("run.rounds=2", ("run", "rounds", 2)),
        ("data.alpha=0.5", ("data", "alpha", 0.5)),
        ("data.partition=iid", ("data", "partition", "iid")),
        ('run.algorithms=["fl", "emo"]', ("run", "algorithms", ["fl", "emo"])),
        ("emo.spill_mib = 0", ("emo", "spill_mib", 0)),
        ("fleet.fixed_sample=true", ("fleet", "fixed_sample", True)),
    ],
)
def test_settings_are_read_as_toml_values(text: str, expected: tuple[str, str, object]) -> None:
    assert parse_setting(text) == expected


def test_settings_override_any_key_validated_like_the_file() -> None:
    config = load_config("quickstart")
    changed = with_settings(config, ["fleet.devices=4", "data.partition=iid", "fl.lr=0.1"])
    assert (changed.fleet.devices, changed.data.partition, changed.fl.lr) == (4, "iid", 0.1)
    for bad, message in (
        ("fleet.devices=four", "fleet.devices: expected an integer"),
        ("data.partition=zipf", "data.partition: 'zipf' is not one of"),
        ("fleet.nope=1", r"\[fleet\]: unknown key"),
        ("nope.x=1", r"no section \[nope\]"),
        ("rounds=2", "expected section.key=value"),
    ):
        with pytest.raises(ConfigError, match=message):
            with_settings(config, [bad])


def test_emo_run_refuses_a_bad_setting_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "quickstart", "--set", "fleet.devices=0", "--broker", "mqtt://127.0.0.1:9"])
    assert code == 2
    assert capsys.readouterr().err.startswith("emo: error: fleet.devices")
