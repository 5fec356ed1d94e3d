"""Models, numpy state round trips, local training determinism and the SplitFed halves."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emo_mqtt.data import Split
from emo_mqtt.errors import ConfigError
from emo_mqtt.models import (
    StateError,
    build_fl_model,
    build_overlay_model,
    load_numpy_state,
    param_count,
    state_to_numpy,
)
from emo_mqtt.training import (
    evaluate,
    make_generator,
    make_rng,
    predict_proba,
    seed_everything,
    sfl_device_backward,
    sfl_server_step,
    train_local,
    train_overlay_steps,
)

# Tiny models: one thread is faster, and immune to a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_split(n: int = 96, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    x = rng.normal(size=(n, 1, 28, 28)).astype(np.float32)
    x[:, 0, y, y] += 4.0  # a learnable signal: class c lights pixel (c, c)
    return Split(x, y.astype(np.int64))


@pytest.mark.parametrize("name", ["cnn-small", "mlp-small"])
def test_fl_model_shapes(name: str) -> None:
    model = build_fl_model(name)
    x = torch.zeros(3, 1, 28, 28)
    assert tuple(model.trunk(x).shape[1:]) == model.activation_shape
    assert model(x).shape == (3, 10)
    assert model.name == name and model.num_classes == 10


def test_model_sizes_and_registry() -> None:
    for name, cut in (("cnn-small", (8, 12, 12)), ("cnn-small-late", (16, 4, 4))):
        fl = build_fl_model(name)
        assert param_count(fl) == 5994 and fl.activation_shape == cut
        for kind in ("overlay-mlp", "overlay-cnn"):
            ov = build_overlay_model(kind, fl.activation_shape)
            assert param_count(ov) > 10 * param_count(fl)
            acts = torch.randn(5, *cut)
            ov.eval()
            assert torch.allclose(ov(acts), ov(acts.reshape(5, -1)))
    with pytest.raises(ConfigError):
        build_fl_model("resnet-huge")
    with pytest.raises(ConfigError):
        build_overlay_model("overlay-cnn", (64,))


def test_numpy_state_round_trip_and_validation() -> None:
    seed_everything(0)
    a, b = build_fl_model(), build_fl_model()
    state = state_to_numpy(a)
    assert list(state) == list(a.state_dict())
    assert all(v.dtype == np.float32 for v in state.values())
    load_numpy_state(b, state)
    assert all(np.array_equal(state[k], v) for k, v in state_to_numpy(b).items())
    bias = list(state)[-1]  # the classifier's bias, (10,)
    state[bias][0] = 123.0  # copies: editing the dict never touches the model
    assert float(a.state_dict()[bias][0]) != 123.0

    bad = dict(state)
    bad.pop(bias)
    with pytest.raises(StateError, match="missing"):
        load_numpy_state(b, bad)
    with pytest.raises(StateError, match="shape"):
        load_numpy_state(b, {**state, bias: np.zeros(11, np.float32)})
    with pytest.raises(StateError, match="dtype"):
        load_numpy_state(b, {**state, bias: np.zeros(10, np.float64)})
    assert isinstance(StateError("x"), ValueError)


def test_batchnorm_overlay_state_keeps_integer_buffers() -> None:
    ov = build_overlay_model("overlay-cnn", (8, 12, 12))
    state = state_to_numpy(ov)
    assert any(v.dtype == np.int64 for v in state.values())  # num_batches_tracked
    load_numpy_state(build_overlay_model("overlay-cnn", (8, 12, 12)), state)


def train_once(capture: str) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, ...]]]:
    seed_everything(1)
    model = build_fl_model()
    seen: list[tuple[np.ndarray, ...]] = []

    def callback(idx: np.ndarray, acts: torch.Tensor, y: np.ndarray) -> None:
        seen.append((idx, acts.numpy().copy(), y))
        if capture == "vandal":  # a callback that mutates what it gets and draws randomness
            acts.mul_(0.0)
            torch.rand(3)
            np.random.rand(3)

    train_local(
        model,
        toy_split(),
        epochs=2,
        batch_size=16,
        lr=0.05,
        momentum=0.9,
        generator=make_generator(7, "train", "dev-0", 0),
        on_activations=None if capture == "none" else callback,
    )
    return state_to_numpy(model), seen


def test_activation_capture_leaves_training_bit_identical() -> None:
    plain, _ = train_once("none")
    captured, seen = train_once("capture")
    vandal, _ = train_once("vandal")
    for key in plain:
        assert np.array_equal(plain[key], captured[key]) and np.array_equal(plain[key], vandal[key])
    assert len(seen) == 2 * 6  # 2 epochs of 96 samples in batches of 16
    idx, acts, y = seen[0]
    assert acts.shape == (16, 8, 12, 12) and idx.shape == y.shape == (16,)
    assert np.array_equal(toy_split().y[idx], y)
    # every sample appears once per epoch
    assert np.array_equal(np.sort(np.concatenate([s[0] for s in seen[:6]])), np.arange(96))


def test_callback_activations_are_the_training_forward() -> None:
    """What the callback gets equals trunk(x) under the weights *before* that step."""
    seed_everything(2)
    model = build_fl_model()
    before = copy.deepcopy(model)
    data = toy_split(16)
    got: list[torch.Tensor] = []
    train_local(
        model,
        data,
        epochs=1,
        batch_size=16,
        lr=0.1,
        generator=make_generator(0),
        on_activations=lambda i, a, y: got.append(a),
    )
    order = torch.randperm(16, generator=make_generator(0))
    with torch.no_grad():
        expect = before.trunk(torch.tensor(data.x)[order])
    assert torch.equal(got[0], expect)


def test_training_is_deterministic_per_stream() -> None:
    def run(key: str) -> np.ndarray:
        seed_everything(3)
        m = build_fl_model()
        train_local(
            m, toy_split(), epochs=1, batch_size=8, lr=0.1, generator=make_generator(0, key)
        )
        return np.concatenate([v.ravel() for v in state_to_numpy(m).values()])

    assert np.array_equal(run("a"), run("a"))
    assert not np.array_equal(run("a"), run("b"))
    assert make_rng(0, "x").random() == make_rng(0, "x").random()


def test_training_learns_and_evaluate_reports() -> None:
    seed_everything(4)
    model = build_fl_model("mlp-small")
    data = toy_split(400)
    before = evaluate(model, data)
    rep = train_local(model, data, epochs=5, batch_size=32, lr=0.1, generator=make_generator(1))
    after = evaluate(model, data)
    assert rep.samples == 2000 and rep.batches == 5 * 13
    assert after.accuracy > 0.9 > before.accuracy and after.loss < before.loss
    probs = predict_proba(model, data.x[:10], batch_size=3)
    assert probs.shape == (10, 10) and np.allclose(probs.sum(1), 1.0)
    same = evaluate(lambda x: torch.softmax(model(x), 1), data, outputs="probs")
    assert same.accuracy == after.accuracy
    with pytest.raises(ConfigError):
        train_local(model, data, epochs=1, batch_size=0, lr=0.1, generator=make_generator(1))


def test_train_overlay_steps_reduces_loss() -> None:
    torch.manual_seed(0)
    ov = build_overlay_model("overlay-mlp", (16, 4, 4))  # 256 inputs
    opt = torch.optim.Adam(ov.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 256)
    acts = rng.normal(size=(256, 256)).astype(np.float32)
    acts[np.arange(256), y] += 3.0
    batches = [(acts[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    first = train_overlay_steps(ov, opt, batches)
    for _ in range(5):
        last = train_overlay_steps(ov, opt, batches)
    assert last < 0.5 * first
    assert np.isnan(train_overlay_steps(ov, opt, []))


def test_splitfed_halves_equal_joint_backprop() -> None:
    """Device forward + server step + device backward == one SGD step on the whole model."""
    seed_everything(5)
    split_model = build_fl_model()
    joint = copy.deepcopy(split_model)
    data = toy_split(32)
    x, y = torch.tensor(data.x), torch.tensor(data.y)

    dev_opt = torch.optim.SGD(split_model.trunk.parameters(), lr=0.1)
    srv_opt = torch.optim.SGD(split_model.head.parameters(), lr=0.1)
    acts = split_model.trunk(x)
    # Over the wire the activations travel as plain arrays; the server sees a leaf tensor.
    wire = torch.tensor(acts.detach().numpy())
    loss, grad = sfl_server_step(split_model.head, srv_opt, wire, data.y)
    assert grad.shape == acts.shape
    sfl_device_backward(acts, torch.tensor(grad.numpy()), dev_opt)

    opt = torch.optim.SGD(joint.parameters(), lr=0.1)
    joint_loss = F.cross_entropy(joint(x), y)
    opt.zero_grad()
    torch.autograd.backward(joint_loss)
    opt.step()
    assert loss == pytest.approx(float(joint_loss.detach()))
    for a, b in zip(split_model.parameters(), joint.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ConfigError):
        sfl_device_backward(split_model.trunk(x), torch.zeros(1), dev_opt)
