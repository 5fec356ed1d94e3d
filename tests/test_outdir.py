"""``emo run --out`` is checked before anything starts (issue 14 item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo_mqtt.cli import main
from emo_mqtt.errors import ConfigError
from emo_mqtt.outdir import MARKER, check_out, is_run_dir, prepare_out

ROOT = Path(__file__).resolve().parent.parent


def test_a_new_or_empty_directory_is_claimed(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        prepare_out(out, "r-1")
        assert json.loads((out / MARKER).read_text())["run"] == "r-1"
        assert is_run_dir(out)


def test_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_out(tmp_path / "afile", "r")


def test_another_runs_results_are_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ow"
    prepare_out(out, "first")
    (out / "emo").mkdir()
    (out / "emo" / "ensemble.npz").write_bytes(b"old")
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_out(out, "second")
    assert (out / "emo" / "ensemble.npz").exists()  # refused: nothing touched
    prepare_out(out, "second", overwrite=True)
    assert not (out / "emo").exists()  # no stale results left for `emo infer`
    assert json.loads((out / MARKER).read_text())["run"] == "second"


def test_a_directory_that_is_not_a_run_is_never_cleared(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="not an emo run"):
            prepare_out(tmp_path, "r", overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_emo_run_refuses_a_bad_out_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any broker is reached or data read: one line, exit 2 (nothing listens at the
    broker address given: checked first, it would have said so instead)."""
    (tmp_path / "afile").write_text("x")
    code = main(
        [
            "run",
            str(ROOT / "scenarios" / "quickstart.toml"),
            "--out",
            str(tmp_path / "afile"),
            "--broker",
            "mqtt://127.0.0.1:9",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"emo: error: --out {tmp_path / 'afile'}: is a file, not a directory; choose a directory"
    ]


def test_dashboard_port_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A port out of range, and one already in use: one line each, exit status 2."""
    import socket

    with pytest.raises(SystemExit) as caught:
        main(["dashboard", "--broker", "mqtt://127.0.0.1:9", "--port", "70000"])
    assert caught.value.code == 2
    assert "port must be 1..65535: '70000'" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["dashboard", "--broker", "mqtt://127.0.0.1:9", "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(
        f"emo: error: dashboard: cannot serve on 127.0.0.1:{port}"
    )


def test_checking_touches_nothing(tmp_path: Path) -> None:
    """``emo run`` checks --out before the broker, and claims it only once the broker is
    found: a start that fails on an unreachable broker leaves no directory behind."""
    check_out(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    prepare_out(tmp_path / "old", "r")
    (tmp_path / "old" / "fl").mkdir()
    check_out(tmp_path / "old", overwrite=True)
    assert (tmp_path / "old" / "fl").exists()
