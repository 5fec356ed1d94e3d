"""Offline EMO experiment (no MQTT): FedAvg alone vs FL + overlays, controller vs send-all.

One FL trajectory is run; the overlay pipelines ride on it. That is legitimate only because
activation capture cannot change FL training (``--check-identity`` re-runs FL without any
capture and compares the final global model bit for bit). Each pipeline has its own device
outboxes, activation RNG streams, controller, replay caches and overlay models:

- ``controller``: :class:`ConvergenceController` throttles share, interval and precision;
- ``send-all``: :class:`SendEverything` (every sample of every batch, fp32).

Usage::

    python benchmarks/offline_emo.py                     # the quickstart settings
    python benchmarks/offline_emo.py --check-identity --sfl v1 v2
    python benchmarks/offline_emo.py --samples-per-device 1000 --rounds 15 \
        --overlay-steps 60 --alpha 0.1 --seed 2        # a larger run
    python benchmarks/offline_emo.py --timing            # unit timings for fleet sizing
    python benchmarks/offline_emo.py --json out.json     # machine-readable results
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from emo_mqtt.cache import ActivationBatch, DeviceOutbox, ReplayCache
from emo_mqtt.controller import (
    Controller,
    ControllerConfig,
    ConvergenceController,
    SendEverything,
    activation_drift,
    select_for_publish,
)
from emo_mqtt.data import (
    Split,
    label_histogram,
    load_fashion_mnist,
    partition_dirichlet,
    subsample_parts,
)
from emo_mqtt.ensemble import Ensemble, fit_combiner
from emo_mqtt.fedavg import fedavg
from emo_mqtt.models import (
    OverlayModel,
    build_fl_model,
    build_overlay_model,
    load_numpy_state,
    param_count,
    state_to_numpy,
)
from emo_mqtt.training import (
    ActivationCallback,
    evaluate,
    evaluate_proba,
    make_generator,
    make_rng,
    seed_everything,
    sfl_device_backward,
    sfl_server_step,
    train_local,
    train_overlay_steps,
)


@dataclass
class Config:
    devices: int = 8
    samples_per_device: int = 600
    alpha: float = 0.3
    rounds: int = 12
    epochs: int = 2
    lr: float = 0.1
    momentum: float = 0.0
    batch: int = 32
    fl_model: str = "cnn-small"
    overlays: int = 2
    overlay_model: str = "overlay-mlp"
    overlay_steps: int = 40
    overlay_batch: int = 64
    overlay_lr: float = 1e-3
    max_staleness: int = 3
    staleness_budget: float = 0.25
    min_coverage: float = 0.5
    fl_fast: float = 0.5
    cache_dtype: str = "float16"
    val_size: int = 2000
    probe_size: int = 256
    eval_every: int = 5
    eval_subset: int = 2000
    seed: int = 0
    threads: int = 1
    pipelines: tuple[str, ...] = ("controller", "send-all")


@dataclass
class Pipeline:
    """One EMO variant riding on the shared FL trajectory."""

    name: str
    controller: Controller
    overlays: dict[str, OverlayModel]
    optimizers: dict[str, torch.optim.Adam]
    caches: dict[str, ReplayCache]
    outboxes: dict[str, DeviceOutbox[ActivationBatch]]
    bytes_sent: int = 0
    samples_sent: int = 0
    overlay_seconds: float = 0.0
    overlay_steps: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)


def overlay_of(device: int, cfg: Config) -> str:
    return f"ov-{device % cfg.overlays}"


def make_pipeline(name: str, cfg: Config, activation_shape: tuple[int, ...], cap: int) -> Pipeline:
    controller: Controller
    if name == "send-all":
        controller = SendEverything()
    else:
        conv = ConvergenceController(
            ControllerConfig(
                max_staleness=cfg.max_staleness,
                staleness_budget=cfg.staleness_budget,
                min_coverage=cfg.min_coverage,
                fl_fast=cfg.fl_fast,
            )
        )
        for d in range(cfg.devices):
            conv.assign(f"dev-{d:02d}", overlay_of(d, cfg))
        controller = conv
    overlays, optimizers, caches = {}, {}, {}
    for o in range(cfg.overlays):
        oid = f"ov-{o}"
        # Same init for both pipelines: differences come from the data they were sent.
        torch.manual_seed(cfg.seed * 1000 + o)
        overlays[oid] = build_overlay_model(cfg.overlay_model, activation_shape)
        optimizers[oid] = torch.optim.Adam(overlays[oid].parameters(), lr=cfg.overlay_lr)
        caches[oid] = ReplayCache(cap, activation_shape, dtype=cfg.cache_dtype)  # type: ignore[arg-type]
    outboxes = {f"dev-{d:02d}": DeviceOutbox[ActivationBatch](8 << 20) for d in range(cfg.devices)}
    return Pipeline(name, controller, overlays, optimizers, caches, outboxes)


def make_publisher(
    pipelines: list[Pipeline], cfg: Config, dev: str, r: int, ids: np.ndarray
) -> ActivationCallback | None:
    """The device-side activation callback: each pipeline's decision, own RNG, own outbox."""
    if not pipelines:
        return None
    decisions = {p.name: p.controller.decide(dev, r) for p in pipelines}
    rngs = {p.name: make_rng(cfg.seed, "activations", p.name, dev, r) for p in pipelines}
    batch_no = 0

    def publish(idx: np.ndarray, acts: torch.Tensor, y: np.ndarray) -> None:
        nonlocal batch_no
        a = acts.numpy()
        for p in pipelines:
            dec = decisions[p.name]
            pos = select_for_publish(dec, batch_no, len(idx), rngs[p.name])
            if pos.size:
                batch = ActivationBatch.quantize(r, ids[idx[pos]], a[pos], y[pos], dec.precision)
                p.outboxes[dev].push(batch)
        batch_no += 1

    return publish


def replay(
    cache: ReplayCache, cfg: Config, r: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Up to ``overlay_steps`` batches sampled from the cache within the staleness bound."""
    for _ in range(cfg.overlay_steps):
        got = cache.sample(cfg.overlay_batch, r, cfg.max_staleness, rng)
        if got is None:
            return
        yield got[0], got[1]


def run(
    cfg: Config,
    *,
    check_identity: bool = False,
    verbose: bool = True,
    dump_probs: str | None = None,
    sfl: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run FL with the EMO pipelines riding on it; the results as a JSON-able dict."""
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    train, test = load_fashion_mnist()
    # The server's validation split: held out from every device (used for the ensemble
    # weights and the drift probes), drawn before partitioning.
    rng = np.random.default_rng(cfg.seed)
    val_idx = rng.choice(len(train), size=cfg.val_size, replace=False)
    pool = np.setdiff1d(np.arange(len(train)), val_idx)
    val = train.subset(val_idx)
    parts = partition_dirichlet(train.y[pool], cfg.devices, cfg.alpha, cfg.seed)
    parts = [pool[p] for p in subsample_parts(parts, cfg.samples_per_device, cfg.seed)]
    hist = label_histogram(train.y, parts)
    device_data = [train.subset(p) for p in parts]
    probe = torch.tensor(val.x[: cfg.probe_size])
    eval_small = test.subset(np.arange(min(cfg.eval_subset, len(test))))

    seed_everything(cfg.seed)
    global_model = build_fl_model(cfg.fl_model)
    shape = global_model.activation_shape
    state = state_to_numpy(global_model)
    init_state = {k: v.copy() for k, v in state.items()}
    caps = [
        sum(len(parts[d]) for d in range(cfg.devices) if overlay_of(d, cfg) == f"ov-{o}")
        for o in range(cfg.overlays)
    ]
    pipelines = [make_pipeline(n, cfg, shape, max(caps)) for n in cfg.pipelines]

    def probe_acts() -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = global_model.trunk(probe).numpy()
        return out

    prev_probe = probe_acts()
    fl_seconds, fl_samples, fl_log = 0.0, 0, []
    for r in range(cfg.rounds):
        updates, losses = [], []
        for d, data in enumerate(device_data):
            dev = f"dev-{d:02d}"
            model = build_fl_model(cfg.fl_model)
            load_numpy_state(model, state)
            publish = make_publisher(pipelines, cfg, dev, r, parts[d])
            t0 = time.perf_counter()
            rep = train_local(
                model,
                data,
                epochs=cfg.epochs,
                batch_size=cfg.batch,
                lr=cfg.lr,
                momentum=cfg.momentum,
                generator=make_generator(cfg.seed, "train", dev, r),
                on_activations=publish,
            )
            fl_seconds += time.perf_counter() - t0
            fl_samples += rep.samples
            losses.append(rep.loss)
            updates.append((dev, state_to_numpy(model), len(data)))
            # Delivery to the overlay (over MQTT in the real system).
            for p in pipelines:
                cache = p.caches[overlay_of(d, cfg)]
                for b in p.outboxes[dev].pop_all():
                    p.bytes_sent += b.nbytes
                    p.samples_sent += len(b)
                    cache.put(dev, b.sample_ids, b.activations(), b.labels, b.round)
        state = fedavg(updates)
        load_numpy_state(global_model, state)
        cur_probe = probe_acts()
        drift = activation_drift(prev_probe, cur_probe)
        prev_probe = cur_probe
        fl_loss = float(np.average(losses, weights=[len(x) for x in device_data]))
        entry: dict[str, Any] = {"round": r, "drift": drift, "fl_loss": fl_loss}
        for p in pipelines:
            p.controller.observe_round(r, drift, fl_loss)
            for oid, ov in p.overlays.items():
                cache = p.caches[oid]
                batches = replay(cache, cfg, r, make_rng(cfg.seed, "replay", p.name, oid, r))
                t0 = time.perf_counter()
                before = cache.stats.sampled_batches
                loss = train_overlay_steps(ov, p.optimizers[oid], batches)
                p.overlay_seconds += time.perf_counter() - t0
                p.overlay_steps += cache.stats.sampled_batches - before
                p.controller.observe_overlay(oid, r, loss)
                entry[f"{p.name}/{oid}/loss"] = loss
            entry[f"{p.name}/bytes"] = p.bytes_sent
            entry[f"{p.name}/decision"] = p.controller.decide("dev-00", r + 1).to_dict()
        if (r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1:
            entry["fl_acc_subset"] = evaluate(global_model, eval_small).accuracy
            if verbose:
                dec = {p.name: p.controller.decide("dev-00", r + 1) for p in pipelines}
                print(
                    f"round {r + 1:3d} fl_acc[{len(eval_small)}]={entry['fl_acc_subset']:.4f} "
                    f"loss={fl_loss:.3f} drift={drift:.3f} "
                    + " ".join(
                        f"{n}: {p.bytes_sent / 1e6:.1f}MB share={dec[n].share:.2f} "
                        f"{dec[n].precision}"
                        for n, p in zip(dec, pipelines, strict=True)
                    ),
                    flush=True,
                )
        fl_log.append(entry)

    results: dict[str, Any] = {"config": asdict(cfg), "label_histogram": hist.tolist()}
    fl_only = Ensemble(global_model, {})
    results["fl"] = asdict(evaluate(global_model, test))
    fl_only.fit(val)
    results["fl_calibrated"] = asdict(fl_only.evaluate(test))
    dumps: dict[str, np.ndarray] = {}
    for p in pipelines:
        res: dict[str, Any] = {
            "bytes": p.bytes_sent,
            "samples_sent": p.samples_sent,
            "overlay_step_s": p.overlay_seconds / max(p.overlay_steps, 1),
            "overlay_steps": p.overlay_steps,
        }
        ens = Ensemble(global_model, p.overlays)
        val_probs, test_probs = ens.member_proba(val.x), ens.member_proba(test.x)
        for name, probs in zip(ens.members, test_probs, strict=True):
            res[f"{name}_alone"] = evaluate_proba(probs, test.y).accuracy
        if dump_probs:
            dumps[f"{p.name}/val"], dumps[f"{p.name}/test"] = (
                np.stack(val_probs),
                np.stack(test_probs),
            )
            dumps["val_y"], dumps["test_y"] = val.y, test.y
        res["ensemble_uniform"] = asdict(evaluate_proba(ens.combiner(test_probs), test.y))
        for pooling in ("linear", "log"):
            ens.combiner = fit_combiner(val_probs, val.y, pooling)
            res[f"ensemble_{pooling}"] = asdict(evaluate_proba(ens.combiner(test_probs), test.y))
        res["weights"] = ens.combiner.weights.tolist()
        results[p.name] = res
    if dump_probs:
        np.savez(dump_probs, allow_pickle=False, **dumps)
    n_total = sum(len(x) for x in device_data)
    act_bytes = int(np.prod(shape)) * 4
    results["sfl_bytes_estimate"] = cfg.rounds * cfg.epochs * n_total * (2 * act_bytes + 8)
    results["fl_weight_bytes"] = cfg.rounds * cfg.devices * 2 * param_count(global_model) * 4
    results["timing"] = {
        "threads": cfg.threads,
        "fl_epoch_s_per_1000": fl_seconds / (fl_samples / 1000),
        "fl_params": param_count(global_model),
        "overlay_params": param_count(build_overlay_model(cfg.overlay_model, shape)),
        "wall_s": time.perf_counter() - t_start,
    }
    results["rounds"] = fl_log
    if check_identity:
        results["fl_bit_identical"] = fl_identity(cfg, parts, train, init_state, state)
    for version in sfl:
        results[f"sfl_{version}"] = run_sfl(cfg, version, parts, train, test, init_state)
    return results


def fl_identity(
    cfg: Config,
    parts: list[np.ndarray],
    train: Split,
    init_state: dict[str, np.ndarray],
    final: dict[str, np.ndarray],
) -> bool:
    """Re-run FL with no activation capture at all; True if the final model is bit-identical."""
    state = init_state
    for r in range(cfg.rounds):
        updates = []
        for d, p in enumerate(parts):
            dev = f"dev-{d:02d}"
            model = build_fl_model(cfg.fl_model)
            load_numpy_state(model, state)
            train_local(
                model,
                train.subset(p),
                epochs=cfg.epochs,
                batch_size=cfg.batch,
                lr=cfg.lr,
                momentum=cfg.momentum,
                generator=make_generator(cfg.seed, "train", dev, r),
            )
            updates.append((dev, state_to_numpy(model), len(p)))
        state = fedavg(updates)
    return all(np.array_equal(state[k], final[k]) for k in final)


def run_sfl(
    cfg: Config,
    version: str,
    parts: list[np.ndarray],
    train: Split,
    test: Split,
    init_state: dict[str, np.ndarray],
) -> dict[str, float]:
    """SplitFed offline, with the same data, init and batch order as FL.

    Per batch: device trunk forward, server head step (:func:`sfl_server_step`), device
    backward with the returned gradient (:func:`sfl_device_backward`). Device trunks are
    FedAvg-ed every round. ``v1``: a head copy per device, averaged every round (the maths of
    FedAvg); ``v2``: one shared head, updated by the devices in turn (sorted ids).
    """
    model = build_fl_model(cfg.fl_model)
    load_numpy_state(model, init_state)
    state = init_state
    shared_head = model.head
    sent = 0
    for r in range(cfg.rounds):
        updates = []
        for d, part in enumerate(parts):
            dev = f"dev-{d:02d}"
            local = build_fl_model(cfg.fl_model)
            load_numpy_state(local, state)
            head = shared_head if version == "v2" else local.head
            dev_opt = torch.optim.SGD(local.trunk.parameters(), lr=cfg.lr)
            srv_opt = torch.optim.SGD(head.parameters(), lr=cfg.lr)
            data = train.subset(part)
            x_all, y_all = torch.tensor(data.x), torch.tensor(data.y)
            gen = make_generator(cfg.seed, "train", dev, r)
            for _ in range(cfg.epochs):
                order = torch.randperm(len(data), generator=gen)
                for start in range(0, len(data), cfg.batch):
                    idx = order[start : start + cfg.batch]
                    acts = local.trunk(x_all[idx])
                    _, grad = sfl_server_step(head, srv_opt, acts.detach(), y_all[idx])
                    sfl_device_backward(acts, grad, dev_opt)
                    sent += 2 * acts.numel() * 4 + idx.numel() * 8
            if version == "v2":
                local.head.load_state_dict(shared_head.state_dict())
            updates.append((dev, state_to_numpy(local), len(part)))
        state = fedavg(updates)
        if version == "v2":  # the server's head is not averaged: put it back
            merged = build_fl_model(cfg.fl_model)
            load_numpy_state(merged, state)
            merged.head.load_state_dict(shared_head.state_dict())
            state = state_to_numpy(merged)
    load_numpy_state(model, state)
    return {"accuracy": evaluate(model, test).accuracy, "bytes": float(sent)}


def summary(res: dict[str, Any]) -> str:
    lines = [
        f"FL (FedAvg) test acc            {res['fl']['accuracy']:.4f}",
        f"FL + calibration (val bias)     {res['fl_calibrated']['accuracy']:.4f}",
    ]
    base = None
    for name in res["config"]["pipelines"]:
        p = res[name]
        alone = " ".join(f"{k[:-6]}={v:.4f}" for k, v in p.items() if k.endswith("_alone"))
        lines.append(
            f"EMO[{name}] ensemble log-pool   {p['ensemble_log']['accuracy']:.4f} "
            f"(linear {p['ensemble_linear']['accuracy']:.4f}, uniform "
            f"{p['ensemble_uniform']['accuracy']:.4f}; {alone}) "
            f"activations {p['bytes'] / 1e6:.1f} MB"
        )
        base = p["bytes"] if name == "send-all" else base
    if base and "controller" in res:
        saved = 1 - res["controller"]["bytes"] / base
        lines.append(f"controller saves {saved:.1%} of send-all activation bytes")
    t = res["timing"]
    lines.append(
        f"SFL activation+gradient bytes (estimate) {res['sfl_bytes_estimate'] / 1e6:.1f} MB; "
        f"FL weights {res['fl_weight_bytes'] / 1e6:.2f} MB"
    )
    step = max((res[n]["overlay_step_s"] for n in res["config"]["pipelines"]), default=0.0)
    lines.append(
        f"timing (torch threads={t['threads']}): FL {t['fl_epoch_s_per_1000']:.3f} s per epoch "
        f"per 1000 samples ({t['fl_params']} params); overlay step {step * 1e3:.2f} ms "
        f"(batch {res['config']['overlay_batch']}, {t['overlay_params']} params); "
        f"wall {t['wall_s']:.1f} s"
    )
    for version in ("v1", "v2"):
        if f"sfl_{version}" in res:
            sfl = res[f"sfl_{version}"]
            lines.append(
                f"SFL-{version.upper()} test acc {sfl['accuracy']:.4f}, activations+gradients "
                f"{sfl['bytes'] / 1e6:.1f} MB"
            )
    if "fl_bit_identical" in res:
        lines.append(f"FL bit-identical without capture: {res['fl_bit_identical']}")
    return "\n".join(lines)


def micro_timings(threads: int, fl_model: str = "cnn-small") -> dict[str, float]:
    """Seconds for the unit operations a fleet is sized by (synthetic data, warm caches)."""
    torch.set_num_threads(threads)
    train, _ = load_fashion_mnist()
    data = train.subset(np.arange(1000))
    seed_everything(0)
    model = build_fl_model(fl_model)
    train_local(model, data, epochs=1, batch_size=32, lr=0.1, generator=make_generator(0))
    t0 = time.perf_counter()
    train_local(model, data, epochs=3, batch_size=32, lr=0.1, generator=make_generator(1))
    out = {"fl_epoch_per_1000_s": (time.perf_counter() - t0) / 3}
    x = torch.tensor(data.x[:32])
    y = torch.tensor(data.y[:32])
    dev_opt = torch.optim.SGD(model.trunk.parameters(), lr=0.1)
    srv_opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    t0 = time.perf_counter()
    for _ in range(50):
        acts = model.trunk(x)
        _, grad = sfl_server_step(model.head, srv_opt, acts.detach(), y)
        sfl_device_backward(acts, grad, dev_opt)
    out["sfl_batch32_compute_s"] = (time.perf_counter() - t0) / 50
    for kind in ("overlay-mlp", "overlay-cnn"):
        ov = build_overlay_model(kind, model.activation_shape)
        opt = torch.optim.Adam(ov.parameters(), lr=1e-3)
        a = np.random.default_rng(0).normal(size=(64, *model.activation_shape)).astype(np.float32)
        lab = np.arange(64) % 10
        train_overlay_steps(ov, opt, [(a, lab)] * 5)
        t0 = time.perf_counter()
        train_overlay_steps(ov, opt, [(a, lab)] * 50)
        out[f"{kind}_step64_s"] = (time.perf_counter() - t0) / 50
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f_name, f_def in asdict(Config()).items():
        if isinstance(f_def, tuple):
            parser.add_argument(f"--{f_name.replace('_', '-')}", nargs="*", default=list(f_def))
        else:
            parser.add_argument(f"--{f_name.replace('_', '-')}", type=type(f_def), default=f_def)
    parser.add_argument("--check-identity", action="store_true")
    parser.add_argument("--sfl", nargs="*", default=[], choices=["v1", "v2"])
    parser.add_argument(
        "--timing", action="store_true", help="only print unit timings (1 and 2 torch threads)"
    )
    parser.add_argument("--json", help="write full results here")
    parser.add_argument("--dump-probs", help="write member probabilities (val/test) to this .npz")
    args = vars(parser.parse_args())
    check, out, dump = args.pop("check_identity"), args.pop("json"), args.pop("dump_probs")
    if args.pop("timing"):
        for threads in (1, 2):
            timings = micro_timings(threads, args["fl_model"])
            print(f"threads={threads} " + " ".join(f"{k}={v:.4f}" for k, v in timings.items()))
        return
    args["pipelines"] = tuple(args["pipelines"])
    sfl = tuple(args.pop("sfl"))
    res = run(Config(**args), check_identity=check, dump_probs=dump, sfl=sfl)
    print(summary(res))
    if out:
        with open(out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
