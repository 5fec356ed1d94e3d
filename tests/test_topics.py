"""The topic grammar: building, parsing, wildcards, and docs/topics.md kept in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from emo_mqtt.errors import TopicError
from emo_mqtt.topics import (
    SPECS,
    Kind,
    markdown_table,
    matches,
    parse,
    run_filter,
    subscription,
    telemetry_filter,
    topic,
    validate_filter,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "topics.md"


def _example(kind: Kind) -> tuple[str | None, str | None]:
    pattern = next(s.pattern for s in SPECS if s.kind == kind)
    return ("d-1" if "{node}" in pattern else None, "device" if "{role}" in pattern else None)


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind: Kind) -> None:
    node, role = _example(kind)
    built = topic(kind, "run-7", node=node, role=role)
    assert built.startswith("emo/run-7/")
    assert parse(built) == parse(built)
    parsed = parse(built)
    assert (parsed.kind, parsed.run, parsed.node, parsed.role) == (kind, "run-7", node, role)
    assert matches(subscription(kind, "run-7"), built)
    assert matches(run_filter("run-7"), built)
    assert not matches(run_filter("run-8"), built)


def test_examples() -> None:
    assert topic(Kind.DEVICE_UPDATE, "r", node="dev3") == "emo/r/device/dev3/update"
    assert subscription(Kind.DEVICE_ACTIVATIONS, "r") == "emo/r/device/+/activations"
    assert (
        topic(Kind.STATUS, "r", node="ov1", role="overlay") == "emo/r/telemetry/status/overlay/ov1"
    )
    assert topic(Kind.SERVER_SFL_GRADIENTS, "r", node="d") == "emo/r/server/sfl/d/gradients"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "emo",
        "emo/r",
        "x/r/device/d/update",
        "emo/r/device/d/nope",
        "emo/r/device/+/update",
        "emo/r/device/d#/update",
        "emo/bad run/server/round",
        "emo/r/telemetry/status/alien/x",
        "emo/r/device//update",
        "emo/r/server/round/extra",
    ],
)
def test_parse_rejects_foreign_topics(bad: str) -> None:
    with pytest.raises(TopicError):
        parse(bad)


@pytest.mark.parametrize("bad_id", ["", "a/b", "+", "#", "a b", "-lead", "x" * 65, "é"])
def test_ids_are_validated(bad_id: str) -> None:
    with pytest.raises(TopicError):
        topic(Kind.DEVICE_UPDATE, "r", node=bad_id)
    with pytest.raises(TopicError):
        topic(Kind.SERVER_ROUND, bad_id)


def test_missing_parts_are_errors() -> None:
    with pytest.raises(TopicError, match="needs a node"):
        topic(Kind.DEVICE_UPDATE, "r")
    with pytest.raises(TopicError, match="unknown role"):
        topic(Kind.STATUS, "r", node="x", role="alien")


@pytest.mark.parametrize(
    ("flt", "value", "expected"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_wildcards(flt: str, value: str, expected: bool) -> None:
    assert matches(flt, value) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "a/\x00"])
def test_validate_filter(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_filter(bad)


def test_docs_table_matches_the_grammar() -> None:
    assert markdown_table() in DOCS.read_text(), (
        "docs/topics.md is out of date: paste the output of `emo topics --markdown` into it"
    )


def test_publisher_key_names_the_accountable_identity() -> None:
    from emo_mqtt.topics import publisher_key

    dev = "device/dev03"
    assert publisher_key(topic(Kind.DEVICE_UPDATE, "r1", node="dev03")) == dev
    assert publisher_key(topic(Kind.DEVICE_ACTIVATIONS, "r2", node="dev03")) == dev
    assert publisher_key(topic(Kind.DEVICE_SFL_ACTIVATIONS, "r1", node="dev03")) == dev
    assert publisher_key(topic(Kind.STATUS, "r1", node="dev03", role="device")) == dev
    assert publisher_key(topic(Kind.METRICS, "r1", node="dev03", role="device")) == dev
    assert publisher_key(topic(Kind.OVERLAY_MODEL, "r1", node="ovl0")) == "overlay/ovl0"
    assert publisher_key(topic(Kind.SERVER_ROUND, "r1")) == "server"
    assert publisher_key(topic(Kind.CONTROL, "r1", node="dev03")) == "server"
    assert publisher_key(topic(Kind.BENCH, "r1", node="data")) == "bench/data"
    assert publisher_key("not/ours") == "not/ours"
    assert {publisher_key(topic(k, "r", node="n", role="device")) for k in Kind} <= {
        "device/n",
        "overlay/n",
        "server",
        "client/n",
        "bench/n",
    }


def test_one_wildcard_takes_all_json_and_no_codec_frame() -> None:
    from emo_mqtt.nodes.base import JSON_KINDS

    every = telemetry_filter()
    assert every == "emo/+/telemetry/#"
    assert telemetry_filter("r7") == "emo/r7/telemetry/#"
    for kind in Kind:
        node, role = _example(kind)
        built = topic(kind, "r7", node=node, role=role)
        assert matches(every, built) == (kind in JSON_KINDS), built
        assert matches(telemetry_filter("r7"), built) == (kind in JSON_KINDS)
        assert not matches(telemetry_filter("r8"), built)
    assert topic(Kind.RUN_STATE, "r7") == "emo/r7/telemetry/run"
    assert parse("emo/r7/telemetry/run").kind is Kind.RUN_STATE
