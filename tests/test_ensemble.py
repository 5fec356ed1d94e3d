"""Ensemble weights, pooling, and the Ensemble's inference and (pickle-free) persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emo_mqtt.data import Split
from emo_mqtt.ensemble import Combiner, Ensemble, combine, fit_combiner, fit_weights
from emo_mqtt.errors import ConfigError
from emo_mqtt.models import build_fl_model, build_overlay_model
from emo_mqtt.training import evaluate_proba

# Tiny models: one thread is faster, and immune to a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def complementary_members(n: int = 3000, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Three noisy experts, each reliable on a different third of the classes.

    Expert k puts 0.7 on the true label for classes it knows and guesses uniformly otherwise;
    together they know everything, so pooling should beat each of them.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 9, size=n)
    members = []
    for k in range(3):
        p = np.full((n, 9), 0.3 / 8)
        known = (y // 3) == k
        p[np.arange(n), y] = np.where(known, 0.7, 0.3 / 8)
        unknown = ~known
        p[unknown] = rng.dirichlet(np.ones(9), size=int(unknown.sum()))
        members.append(p / p.sum(1, keepdims=True))
    return members, y


def acc(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(p.argmax(1) == y))


def test_weights_on_simplex_and_deterministic() -> None:
    members, y = complementary_members()
    w = fit_weights(members, y)
    assert w.shape == (3,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert np.array_equal(w, fit_weights(members, y))
    assert fit_weights(members[:1], y).tolist() == [1.0]


def test_weights_prefer_the_better_member() -> None:
    _, y = complementary_members()
    noise = np.random.default_rng(1).dirichlet(np.ones(9), size=y.size)
    good = 0.9 * np.eye(9)[y] + 0.1 / 9
    w = fit_weights([noise, good], y)
    assert w[1] > 0.9


@pytest.mark.parametrize("pooling", ["linear", "log"])
def test_ensemble_beats_each_member(pooling: str) -> None:
    members, y = complementary_members(seed=2)
    test_members, ty = complementary_members(seed=3)
    comb = fit_combiner(members, y, pooling)  # type: ignore[arg-type]
    pooled = comb(test_members)
    assert np.allclose(pooled.sum(1), 1.0)
    assert acc(pooled, ty) > max(acc(m, ty) for m in test_members) + 0.1


def test_log_pool_class_bias_corrects_a_shared_prior() -> None:
    """Members trained on skewed labels over-predict class 0; the bias undoes it."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, size=4000)
    logits = 2.0 * np.eye(4)[y] + rng.normal(size=(4000, 4))
    logits[:, 0] += 1.5  # skewed prior
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    plain = fit_combiner([p], y, "log", class_bias=False)
    biased = fit_combiner([p], y, "log")
    assert biased.class_bias is not None and biased.class_bias[0] < biased.class_bias[1:].min()
    assert acc(biased([p]), y) > acc(plain([p]), y) + 0.05


def test_combine_validation() -> None:
    members, _ = complementary_members(30)
    assert np.allclose(combine(members, [1.0, 0.0, 0.0]), members[0])
    for bad in ([0.5, 0.5], [1.5, -0.5, 0.0], [0.2, 0.2, 0.2]):
        with pytest.raises(ConfigError):
            combine(members, bad)
    with pytest.raises(ConfigError):
        fit_combiner(members, np.zeros(29, np.int64))


def small_split(n: int = 64) -> Split:
    rng = np.random.default_rng(0)
    return Split(rng.normal(size=(n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n))


def make_ensemble(scaling: str = "horizontal") -> Ensemble:
    torch.manual_seed(0)
    fl = build_fl_model()
    overlays = {
        "ov-a": build_overlay_model("overlay-mlp", fl.activation_shape),
        "ov-b": build_overlay_model("overlay-cnn", fl.activation_shape),
    }
    return Ensemble(fl, overlays, scaling=scaling)  # type: ignore[arg-type]


def test_ensemble_members_and_predict() -> None:
    ens = make_ensemble()
    data = small_split()
    assert ens.members == ["fl", "ov-a", "ov-b"]
    probs = ens.member_proba(data.x, batch_size=16)
    assert len(probs) == 3 and all(p.shape == (64, 10) for p in probs)
    with torch.no_grad():
        fl_probs = torch.softmax(ens.fl_model(torch.tensor(data.x)).double(), 1).numpy()
    assert np.allclose(probs[0], fl_probs)
    # unfitted: equal linear weights
    assert np.allclose(ens.predict_proba(data.x), np.mean(probs, axis=0))
    comb = ens.fit(data)
    assert comb.pooling == "log" and ens.combiner is comb
    rep = ens.evaluate(data)
    assert rep.samples == 64 and rep == evaluate_proba(ens.predict_proba(data.x), data.y)


def test_vertical_scaling_members() -> None:
    ens = make_ensemble("vertical")
    assert ens.members == ["ov-a", "ov-b"]
    blended = Ensemble(ens.fl_model, ens.overlays, scaling="vertical", blend_fl=True)
    assert blended.members == ["fl", "ov-a", "ov-b"]
    with pytest.raises(ConfigError):
        Ensemble(ens.fl_model, {}, scaling="vertical")
    with pytest.raises(ConfigError):
        Ensemble(ens.fl_model, ens.overlays, scaling="horizontal", blend_fl=False)
    with pytest.raises(ConfigError):
        Ensemble(ens.fl_model, {"fl": ens.overlays["ov-a"]})


def test_state_round_trip_and_file(tmp_path: Path) -> None:
    import json

    ens = make_ensemble()
    data = small_split()
    ens.fit(data)
    config, arrays = ens.to_state()
    json.dumps(config)  # JSON-able
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    back = Ensemble.from_state(json.loads(json.dumps(config)), arrays)
    assert back.members == ens.members
    assert np.array_equal(back.predict_proba(data.x), ens.predict_proba(data.x))

    path = tmp_path / "ens.npz"
    ens.save(path)
    loaded = Ensemble.load(path)
    assert np.array_equal(loaded.predict_proba(data.x), ens.predict_proba(data.x))
    with np.load(path, allow_pickle=False) as npz:  # nothing in it needs pickle
        assert "__config__" in npz.files

    broken = dict(arrays)
    broken.pop("overlay/ov-a/body.2.weight")
    with pytest.raises(ValueError, match="missing"):
        Ensemble.from_state(config, broken)
    with pytest.raises(ConfigError):
        Ensemble.from_state({k: v for k, v in config.items() if k != "fl_model"}, arrays)


def test_combiner_state_round_trip() -> None:
    members, y = complementary_members(500)
    for pooling in ("linear", "log"):
        comb = fit_combiner(members, y, pooling)
        cfg, arrays = comb.to_state()
        again = Combiner.from_state(cfg, arrays)
        assert np.array_equal(again(members), comb(members))
    with pytest.raises(ConfigError):
        Combiner.from_state({"pooling": "max"}, {"weights": np.ones(1)})
