"""Ensemble inference: from Python, from ``emo infer`` on a saved run, and over MQTT.

A run saved by ``emo run`` holds, per algorithm, ``fl_model.npz`` and (for EMO)
``ensemble.npz`` (the FL model, the overlay models and the fitted combiner; numpy arrays and
JSON, never pickles) next to ``server.json``. :func:`load_predictor` turns them into a
:class:`Predictor`; :func:`serve_inference` answers requests published on
``emo/<run>/infer/<client>/request`` on ``emo/<run>/infer/<client>/response``, and
:func:`request_inference` is the matching client.

Requests carry ``images``: float32 (N, 1, 28, 28) normalised as ``emo_mqtt.data`` does, or
raw uint8 (N, 28, 28) pixels, which the service normalises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emo_mqtt import codec
from emo_mqtt.bus import open_bus
from emo_mqtt.data import FMNIST_MEAN, FMNIST_STD, load_fashion_mnist
from emo_mqtt.ensemble import Ensemble
from emo_mqtt.errors import CodecError, ConfigError, EmoError
from emo_mqtt.messages import InferRequest, InferResponse, Limits, MessageError, check_kind
from emo_mqtt.models import FLModel, build_fl_model, load_numpy_state
from emo_mqtt.topics import Kind, parse, subscription, topic
from emo_mqtt.training import predict_proba

MAX_IMAGES_PER_REQUEST = 4096


@dataclass
class Predictor:
    """The model an algorithm deploys: the ensemble for EMO, the FL model otherwise."""

    run: str
    algorithm: str
    fl_model: FLModel
    ensemble: Ensemble | None

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, 10) for normalised float32 images (N, 1, 28, 28)."""
        if self.ensemble is not None:
            return self.ensemble.predict_proba(images)
        return predict_proba(self.fl_model, images, 1024)

    def member_proba(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if self.ensemble is None:
            return {"fl": self.predict_proba(images)}
        members = self.ensemble.member_proba(images)
        return dict(zip(self.ensemble.members, members, strict=True))


def load_predictor(run_dir: Path, algorithm: str = "emo") -> Predictor:
    """Load what ``emo run`` saved for ``algorithm`` under ``run_dir``."""
    where = run_dir / algorithm
    try:
        meta = json.loads((where / "server.json").read_text())
    except FileNotFoundError:
        seeds = sorted(p.name for p in run_dir.glob("seed-*") if p.is_dir())
        if seeds:  # the top of an `emo run --seeds` directory: the models are per seed
            raise ConfigError(
                f"{run_dir} holds one run per seed ({', '.join(seeds)}): give one of them, "
                f"e.g. {run_dir / seeds[0]}"
            ) from None
        raise ConfigError(
            f"{where} holds no saved run (no server.json); run `emo run` first"
        ) from None
    ensemble = Ensemble.load(where / "ensemble.npz") if (where / "ensemble.npz").exists() else None
    if ensemble is not None:
        fl = ensemble.fl_model
    else:
        fl = build_fl_model(meta["fl_model"])
        with np.load(where / "fl_model.npz", allow_pickle=False) as npz:
            load_numpy_state(fl, {k: npz[k] for k in npz.files})
    return Predictor(meta["run"], algorithm, fl, ensemble)


def normalise_images(images: Any) -> np.ndarray:
    """Validate request images and return float32 (N, 1, 28, 28); ConfigError if unusable."""
    x = np.asarray(images)
    if x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (28, 28):
        x = ((x.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD)[:, None]
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != (1, 28, 28):
        raise ConfigError(
            f"images must be float32 (N,1,28,28) or uint8 (N,28,28), got {x.dtype} {x.shape}"
        )
    if not 1 <= x.shape[0] <= MAX_IMAGES_PER_REQUEST:
        raise ConfigError(f"a request holds 1..{MAX_IMAGES_PER_REQUEST} images, not {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ConfigError("images contain NaN or Inf")
    return x


def evaluate_saved(predictor: Predictor, data_dir: str | None, limit: int) -> dict[str, Any]:
    """Accuracy of the deployed model and of each ensemble member on the test set."""
    _, test = load_fashion_mnist(data_dir)
    x, y = (test.x[:limit], test.y[:limit]) if limit else (test.x, test.y)
    out: dict[str, Any] = {"run": predictor.run, "algorithm": predictor.algorithm, "images": len(y)}
    out["accuracy"] = float(np.mean(predictor.predict_proba(x).argmax(1) == y))
    for name, probs in predictor.member_proba(x).items():
        out[f"member_accuracy.{name}"] = float(np.mean(probs.argmax(1) == y))
    return out


async def serve_inference(
    broker: str,
    predictor: Predictor,
    *,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Answer inference requests for ``predictor.run`` until ``stop`` is set."""
    run = predictor.run
    limits = Limits(max_images=MAX_IMAGES_PER_REQUEST)
    bus = open_bus(broker, f"{run}-infer-service", clean_start=True)
    stop = stop or asyncio.Event()
    async with bus:
        await bus.subscribe(subscription(Kind.INFER_REQUEST, run))
        if ready is not None:
            ready.set()
        messages = bus.messages()
        pending: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            get = asyncio.ensure_future(anext(messages))
            halt = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({get, halt}, return_when=asyncio.FIRST_COMPLETED)
            halt.cancel()
            if get not in done:
                get.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return
            message = get.result()
            try:
                client = parse(message.topic).node or ""
                env = codec.decode(message.payload)
                check_kind(env.kind, InferRequest.KIND)
                request_id = str(env.body["request_id"])
            except (EmoError, KeyError) as exc:
                bus.reject("bad_request", message.topic, str(exc))
                continue
            try:
                request = InferRequest.from_body(env.body, limits=limits)
                images = normalise_images(request.images)
                answer = InferResponse(
                    request_id, predictor.predict_proba(images).astype(np.float32)
                )
            except (ConfigError, MessageError) as exc:
                bus.reject("bad_request", message.topic, str(exc))
                answer = InferResponse(request_id, None, str(exc))
            body = answer.to_body()
            # Not awaited in the loop: see Node.spawn on why handlers never await publishes.
            reply = asyncio.create_task(
                bus.publish(
                    topic(Kind.INFER_RESPONSE, run, node=client),
                    codec.encode(body, kind="infer.response", sender="infer", run=run),
                )
            )
            pending.add(reply)
            reply.add_done_callback(pending.discard)


async def request_inference(
    broker: str, run: str, images: np.ndarray, *, client: str | None = None, timeout: float = 30.0
) -> np.ndarray:
    """Ask a running inference service of ``run`` for class probabilities of ``images``."""
    client = client or f"client-{secrets.token_hex(4)}"
    request_id = secrets.token_hex(8)
    bus = open_bus(broker, f"{run}-{client}", clean_start=True)
    async with bus:
        await bus.subscribe(topic(Kind.INFER_RESPONSE, run, node=client))
        await bus.publish(
            topic(Kind.INFER_REQUEST, run, node=client),
            codec.encode(
                InferRequest(request_id, np.asarray(images)).to_body(),
                kind=InferRequest.KIND,
                sender=client,
                run=run,
            ),
        )
        async with asyncio.timeout(timeout):
            async for message in bus.messages():
                try:
                    response = InferResponse.from_body(
                        codec.decode(message.payload).body, limits=Limits()
                    )
                except (CodecError, MessageError):
                    continue
                if response.request_id != request_id:
                    continue
                if response.error is not None:
                    raise ConfigError(f"inference service refused the request: {response.error}")
                assert response.probs is not None
                return np.asarray(response.probs)
    raise EmoError("bus closed before the inference response arrived")


def infer_command(
    run_dir: Path,
    *,
    algorithm: str,
    data_dir: str | None,
    broker: str | None,
    serve: bool,
    limit: int,
) -> dict[str, Any]:
    """``emo infer``: evaluate a saved run, or serve it over MQTT with ``--serve``."""
    predictor = load_predictor(run_dir, algorithm)
    if serve:
        if broker is None:
            raise ConfigError("--serve needs --broker URL (the broker the clients use)")
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_inference(broker, predictor))
        return {"served": predictor.run}
    return evaluate_saved(predictor, data_dir, limit)
