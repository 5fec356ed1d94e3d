"""``emo run --resume`` and ``--seeds`` (issue 14 item 2, issue 13 item 9).

The decisions (what to keep, what to run, which configuration may resume) are pure and
tested fast; two broker tests run real fleets: a partial output directory (FL only) is
resumed with FL and EMO, and a ``--seeds`` run interrupted during its second seed keeps the
first seed and is resumed to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import stream_lines

from emo_mqtt.cli import main
from emo_mqtt.config import load_config
from emo_mqtt.errors import ConfigError
from emo_mqtt.multirun import config_record
from emo_mqtt.outdir import MARKER, check_out, prepare_out
from emo_mqtt.resume import (
    comparable_config,
    config_differences,
    config_digest,
    plan_algorithms,
)

ROOT = Path(__file__).resolve().parent.parent
EMO = str(Path(sys.executable).with_name("emo"))


# ------------------------------------------------------------------ pure decisions


def test_finished_algorithms_with_models_are_kept_the_rest_run() -> None:
    previous = {
        "state": "interrupted",
        "algorithms": {"fl": {"accuracy": 0.5}, "sfl": {"accuracy": 0.6}},
        "interrupted": {"algorithm": "emo", "last_round": 2},
    }
    models = {"fl", "emo"}  # sfl's model is gone; emo has one but never finished
    plan = plan_algorithms(previous, ["fl", "sfl", "emo", "emo_all"], models.__contains__)
    assert list(plan.keep) == ["fl"]
    assert plan.run == ["sfl", "emo", "emo_all"]
    assert not plan.complete


def test_nothing_to_resume_runs_everything_and_extras_are_kept() -> None:
    assert plan_algorithms(None, ["fl", "emo"], lambda _a: True).run == ["fl", "emo"]
    previous = {"state": "finished", "algorithms": {"fl": {"a": 1}, "sfl": {"a": 2}}}
    plan = plan_algorithms(previous, ["fl"], lambda _a: True)
    assert plan.complete and list(plan.keep) == ["fl", "sfl"]  # sfl: finished, not asked


def test_the_config_hash_ignores_id_algorithms_and_under_seeds_the_seed() -> None:
    base = load_config(ROOT / "scenarios" / "quickstart.toml")
    other = base.with_overrides(run={"id": "x-1", "algorithms": ["fl"]})
    assert config_digest(config_record(base)) == config_digest(config_record(other))
    reseeded = base.with_overrides(run={"seed": 7})
    assert config_digest(config_record(base)) != config_digest(config_record(reseeded))
    assert config_record(base, seeded=True) == config_record(reseeded, seeded=True)
    longer = base.with_overrides(run={"rounds": base.run.rounds + 1})
    diff = config_differences(config_record(base), config_record(longer))
    assert diff == [f"run.rounds: {base.run.rounds} -> {base.run.rounds + 1}"]
    assert "seed" not in comparable_config(base.to_dict(), seeded=True)["run"]


def test_check_out_with_resume(tmp_path: Path) -> None:
    base = config_record(load_config(ROOT / "scenarios" / "quickstart.toml"))
    out = tmp_path / "out"
    check_out(out, resume=True, config=base)  # nothing there yet: a first run
    prepare_out(out, "r-1", config=base)
    assert json.loads((out / MARKER).read_text())["config_sha256"] == config_digest(base)
    (out / "fl").mkdir()
    prepare_out(out, "r-2", resume=True, config=base)
    assert (out / "fl").is_dir()  # kept
    changed = json.loads(json.dumps(base))
    changed["fleet"]["devices"] += 1
    with pytest.raises(ConfigError, match=r"configuration changed .*fleet\.devices: "):
        check_out(out, resume=True, config=changed)
    with pytest.raises(ConfigError, match="holds a run without --seeds"):
        check_out(out, resume=True, config=base, seeds=[1, 2])
    with pytest.raises(ConfigError, match="exclude each other"):
        check_out(out, resume=True, overwrite=True, config=base)
    (out / MARKER).write_text(json.dumps({"run": "old"}))  # an older emo run's marker
    with pytest.raises(ConfigError, match="records no configuration"):
        check_out(out, resume=True, config=base)


def test_infer_on_the_top_of_a_seeds_directory_names_the_seed_directories(
    tmp_path: Path,
) -> None:
    from emo_mqtt.infer import load_predictor

    for seed in (1, 2):
        (tmp_path / f"seed-{seed}" / "emo").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"one run per seed \(seed-1, seed-2\)"):
        load_predictor(tmp_path, "emo")


@pytest.mark.parametrize("seeds", ["1,1", "1,x", "-1", ""])
def test_bad_seed_lists_are_refused(seeds: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "quickstart", "--seeds", seeds, "--broker", "mqtt://127.0.0.1:9"])
    assert caught.value.code == 2
    assert "--seeds" in capsys.readouterr().err


# ------------------------------------------------------------------ real runs


def _emo(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([EMO, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.broker
def test_a_partial_out_is_resumed(tmp_path: Path, tiny_scenario: Callable[[str], Path]) -> None:
    scenario, out = str(tiny_scenario("res")), str(tmp_path / "out")
    common = ["--rounds", "1", "--out", out, "--quiet", "--json"]
    first = json.loads(_emo("run", scenario, "--algorithms", "fl", *common).stdout)
    model = tmp_path / "out" / "fl" / "fl_model.npz"
    saved = model.stat().st_mtime_ns
    result = _emo("run", scenario, "--algorithms", "fl,emo", "--resume", *common)
    second = json.loads(result.stdout)
    assert list(second["algorithms"]) == ["fl", "emo"]
    assert second["kept_from_earlier_run"] == ["fl"]
    assert second["algorithms"]["fl"] == first["algorithms"]["fl"]  # kept, not rerun
    assert model.stat().st_mtime_ns == saved
    assert (tmp_path / "out" / "emo" / "ensemble.npz").is_file()
    assert second["comparisons"]["fl_model_identical_with_overlays"] is True
    assert second["run_id"] != first["run_id"]
    # A changed configuration is refused before anything runs.
    refused = subprocess.run(
        [EMO, "run", scenario, "--rounds", "2", "--out", out, "--resume"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "run.rounds: 1 -> 2" in refused.stderr


@pytest.mark.broker
def test_seeds_interrupted_then_resumed(
    tmp_path: Path, tiny_scenario: Callable[[str], Path]
) -> None:
    scenario, out = str(tiny_scenario("sds")), tmp_path / "out"
    args = [EMO, "run", scenario, "--algorithms", "fl", "--seeds", "3,5", "--out", str(out)]
    # PYTHONFAULTHANDLER: if the interrupted run hangs, SIGABRT below dumps every thread's
    # stack into its stderr, and the failure shows where it hung.
    proc = subprocess.Popen(
        [*args, "--rounds", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert proc.stderr is not None
    lines, seen = stream_lines(proc.stderr), list[str]()
    deadline = time.monotonic() + 200
    try:
        while True:  # until seed 5 starts: seed 3 is finished and recorded
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "emo run ended early:\n" + "".join(seen)
            seen.append(line)
            if line.startswith("=== seed 5"):
                break
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(30)
            while (line := lines.get(timeout=10)) is not None:
                seen.append(line)
            pytest.fail("emo run did not end within 120 s of SIGINT:\n" + "".join(seen)[-8000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    err = "".join(seen)
    assert code == 130, err
    assert "interrupted during seed 5" in err and "finished seeds: 3" in err, err
    top = json.loads((out / "summary.json").read_text())
    assert top["state"] == "interrupted" and top["seeds"] == [3, 5]
    assert top["interrupted"]["seed"] == 5
    assert top["runs"]["3"]["state"] == "finished"
    assert top["runs"]["5"]["state"] == "interrupted"
    acc = top["algorithms"]["fl"]["accuracy"]
    assert acc["values"][1] is None and acc["n"] == 1
    first_id = top["runs"]["3"]["run_id"]
    assert json.loads((out / "seed-3" / "summary.json").read_text())["config"]["run"]["seed"] == 3

    result = subprocess.run(
        [*args, "--rounds", "1", "--resume", "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)
    assert top["state"] == "finished"
    assert top["runs"]["3"] == {**top["runs"]["3"], "run_id": first_id, "kept": True}
    assert top["runs"]["5"]["state"] == "finished" and top["runs"]["5"]["run_id"] != first_id
    acc = top["algorithms"]["fl"]["accuracy"]
    assert acc["n"] == 2 and None not in acc["values"] and acc["std"] is not None
    seed5 = json.loads((out / "seed-5" / "summary.json").read_text())
    assert seed5["config"]["run"]["seed"] == 5 and seed5["state"] == "finished"
    assert acc["values"][1] == seed5["algorithms"]["fl"]["accuracy"]
    assert "| 3 | finished |" in (out / "report.md").read_text()
