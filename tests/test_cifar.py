"""CIFAR-10 in its binary format (files generated here in that exact format), models built for
its 3x32x32 images, and Fashion-MNIST's models unchanged bit for bit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from emo_mqtt.cifar import (
    CIFAR10_DIR_ENV,
    CIFAR10_MEAN,
    CIFAR10_STD,
    RECORD_BYTES,
    TEST_FILE,
    TRAIN_FILES,
    find_cifar10_dir,
    load_cifar10,
)
from emo_mqtt.config import from_dict, load_config
from emo_mqtt.dataplan import plan_data
from emo_mqtt.errors import ConfigError
from emo_mqtt.models import (
    FL_MODELS,
    OVERLAY_MODELS,
    build_fl_model,
    build_overlay_model,
    state_to_numpy,
)
from emo_mqtt.training import make_generator, train_local, train_overlay_steps

ROOT = Path(__file__).resolve().parents[1]


def records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``n`` CIFAR-10 records: label byte, then red, green and blue 32x32 planes, row-major."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) + seed) % 10
    pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    raw = b"".join(
        bytes([int(label)]) + img.tobytes() for label, img in zip(labels, pixels, strict=True)
    )
    return raw, labels, pixels


def write_cifar(directory: Path, per_batch: int = 60, test: int = 50) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(TRAIN_FILES):
        (directory / name).write_bytes(records(per_batch, i)[0])
    (directory / TEST_FILE).write_bytes(records(test, 9)[0])
    return directory


def test_reads_the_binary_format(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    train, test = load_cifar10(tmp_path)
    assert (len(train), len(test)) == (300, 50)
    assert train.x.shape == (300, 3, 32, 32) and train.x.dtype == np.float32
    assert train.y.dtype == np.int64 and not train.x.flags.writeable
    # Record 7 of data_batch_2.bin is training sample 67: label and channel-major pixels.
    _, labels, pixels = records(60, 1)
    assert int(train.y[67]) == int(labels[7])
    for channel in range(3):
        want = (pixels[7, channel] / 255.0 - CIFAR10_MEAN[channel]) / CIFAR10_STD[channel]
        assert np.allclose(train.x[67, channel], want, atol=1e-5)
    assert list(test.y[:3]) == [9, 0, 1]


def test_directory_layouts_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inner = write_cifar(tmp_path / "cifar-10-batches-bin")
    assert find_cifar10_dir(tmp_path) == inner
    monkeypatch.setenv(CIFAR10_DIR_ENV, str(inner))
    assert find_cifar10_dir(None) == inner
    monkeypatch.delenv(CIFAR10_DIR_ENV)
    with pytest.raises(ConfigError, match=r"data\.data_dir.*--data-dir.*EMO_CIFAR10_DIR"):
        find_cifar10_dir(None)


def test_missing_files_are_named(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    (tmp_path / TEST_FILE).unlink()
    with pytest.raises(ConfigError) as err:
        load_cifar10(tmp_path)
    assert f"missing in {tmp_path}: data_batch_3.bin, test_batch.bin" in str(err.value)


def test_truncated_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_4.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConfigError) as err:
        load_cifar10(tmp_path)
    text = str(err.value)
    assert "truncated" in text and str(path) in text and str(60 * RECORD_BYTES - 100) in text
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="truncated"):
        load_cifar10(tmp_path)
    raw = bytearray(records(60, 3)[0])
    raw[5 * RECORD_BYTES] = 10
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="record 5 has label 10"):
        load_cifar10(tmp_path)


def cifar_config(data_dir: Path, **data: object) -> dict[str, object]:
    return {
        "run": {"rounds": 1, "seed": 3},
        "fleet": {"devices": 4, "overlays": 2},
        "fl": {"model": "cnn-small@3x32x32"},
        "data": {
            "dataset": "cifar10",
            "data_dir": str(data_dir),
            "validation_samples": 100,
            "eval_samples_per_round": 100,
            "samples_per_device": 0,
            **data,
        },
    }


def test_one_training_step_on_cifar_through_the_data_plan(
    tmp_path: Path, one_torch_thread: None
) -> None:
    write_cifar(tmp_path)
    config = from_dict(cifar_config(tmp_path, partition="dirichlet", alpha=0.5))
    plan = plan_data(config)
    assert len(plan.validation) == 100 and len(plan.test) == 50 and len(plan.eval_subset) == 50
    assert sum(len(plan.device(d)) for d in config.device_ids()) == 200
    data = plan.device("dev01")
    assert data.x.shape[1:] == (3, 32, 32) and len(data) >= 10
    torch.manual_seed(0)
    model = build_fl_model(config.fl.model)
    before = {k: v.copy() for k, v in state_to_numpy(model).items()}
    captured: list[torch.Tensor] = []
    report = train_local(
        model,
        data,
        epochs=1,
        batch_size=len(data),
        lr=0.1,
        generator=make_generator(0, "t"),
        on_activations=lambda _i, acts, _y: captured.append(acts),
    )
    assert report.batches == 1 and np.isfinite(report.loss)
    after = state_to_numpy(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert tuple(captured[0].shape[1:]) == model.activation_shape == (8, 14, 14)
    for name in OVERLAY_MODELS:
        overlay = build_overlay_model(name, model.activation_shape)
        opt = torch.optim.Adam(overlay.parameters(), lr=1e-3)
        loss = train_overlay_steps(overlay, opt, [(captured[0].numpy(), data.y)])
        assert np.isfinite(loss)


def test_the_plan_refuses_a_fleet_the_copy_cannot_hold(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    # 30 devices x 10 fit CIFAR-10's 48,000 (so the scenario loads) but not this 200-sample copy.
    config = from_dict({**cifar_config(tmp_path), "fleet": {"devices": 30, "overlays": 2}})
    with pytest.raises(ConfigError) as err:
        plan_data(config)
    text = str(err.value)
    for part in (
        "fleet.devices 30",
        "data.min_samples_per_device 10",
        "300 training samples",
        "only 200 are available",
        "300 in cifar10 minus data.validation_samples 100",
    ):
        assert part in text, text


@pytest.mark.parametrize("partition", ["iid", "shards"])
def test_other_partitions_and_size_skew_on_cifar(tmp_path: Path, partition: str) -> None:
    write_cifar(tmp_path)
    config = from_dict(
        cifar_config(
            tmp_path,
            partition=partition,
            shards_per_device=2,
            size_skew="lognormal",
            samples_per_device=40,
        )
    )
    plan = plan_data(config)
    sizes = [len(plan.device(d)) for d in config.device_ids()]
    assert sum(sizes) == 160 and min(sizes) >= 10


def test_paper_cifar10_scenario_is_the_paper_run_on_cifar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CIFAR10_DIR_ENV, raising=False)
    cifar = load_config(ROOT / "scenarios" / "paper_cifar10.toml")
    paper = load_config(ROOT / "scenarios" / "paper.toml")
    assert cifar.data.dataset == "cifar10" and cifar.fl.model.endswith("@3x32x32")
    assert cifar.run.algorithms == paper.run.algorithms
    with pytest.raises(ConfigError, match="EMO_CIFAR10_DIR"):
        plan_data(cifar.with_overrides(data={"data_dir": ""}))


# sha256 of each model's initial state after torch.manual_seed(7), computed before the models
# took an input shape (commit 2169867): Fashion-MNIST's models must stay bit-identical.
MODEL_STATES = [
    ("cnn-small", None, "00b6a48f8a7fe30e2875e12e11a7eb59d408bc35ab53b82d9bc6f276bb31740c"),
    (
        "cnn-small",
        "overlay-cnn",
        "49455f97db8e5bccf5577f0f505b7bdb0cf6f513546e2362d82ae04382da4fb4",
    ),
    (
        "cnn-small",
        "overlay-mlp",
        "b944659ece912cc62e59d660f7e617e212ea82f8c922e377012a57a0c901eaa6",
    ),
    ("cnn-small-late", None, "03543e8ac52630265f87dda9eee518f744b1ffa6f22a043874adc2cf3c9d1a3c"),
    (
        "cnn-small-late",
        "overlay-cnn",
        "644df3d6e9503d0df2bfe565dab420df6071f782715b02db2095a0950bfc6333",
    ),
    (
        "cnn-small-late",
        "overlay-mlp",
        "8cd288d548c2a59069b30d15b1028ff6a39dd480c68c4fc9a38c5b6f74f3fbf3",
    ),
    ("mlp-small", None, "ddd0c7c9e0fc01f4a54051e41917e4e46791735c6b90f8c24e47ee3b605ff222"),
    (
        "mlp-small",
        "overlay-mlp",
        "0d9fba0d5350ffba9359dc7c12a11db03fff5c57a908e0ba4e1489a11e7143fd",
    ),
]


def state_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in state_to_numpy(module).items():
        h.update(key.encode())
        h.update(value.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize(("fl_name", "overlay", "digest"), MODEL_STATES)
def test_fashion_models_initialise_as_before(
    fl_name: str, overlay: str | None, digest: str
) -> None:
    torch.manual_seed(7)
    fl = build_fl_model(fl_name)
    if overlay is None:
        assert state_digest(fl) == digest and fl.name == fl_name
        return
    torch.manual_seed(7)
    assert state_digest(build_overlay_model(overlay, fl.activation_shape)) == digest


@pytest.mark.parametrize("name", sorted(FL_MODELS))
def test_every_model_takes_cifar_shapes(name: str) -> None:
    fl = build_fl_model(f"{name}@3x32x32")
    assert fl.name == f"{name}@3x32x32" and fl.input_shape == (3, 32, 32)
    x = torch.zeros(2, 3, 32, 32)
    assert tuple(fl(x).shape) == (2, 10)
    assert tuple(fl.trunk(x).shape[1:]) == fl.activation_shape
    # The same name builds the same layers: a saved model is rebuilt for its input.
    assert state_to_numpy(build_fl_model(fl.name)).keys() == state_to_numpy(fl).keys()


@pytest.mark.parametrize("name", ["cnn-small@1x12x12", "cnn-small-late@3x12x12"])
def test_images_too_small_for_the_convolutions_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="too small for its 5x5 convolutions"):
        build_fl_model(name)
