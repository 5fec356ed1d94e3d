"""The package's one exception hierarchy.

Every error emo-mqtt raises on purpose derives from :class:`EmoError`. Errors caused by
bad input (bytes from the network, topics, config files) also derive from ``ValueError``
so callers that only know the standard library still catch them.
"""

from __future__ import annotations


class EmoError(Exception):
    """Root of every exception emo-mqtt raises on purpose."""


class CodecError(EmoError, ValueError):
    """A payload could not be encoded or decoded (malformed, truncated, wrong version...)."""


class ChunkError(CodecError):
    """A chunk frame was malformed, inconsistent with its transfer, failed its checksum, or
    did not fit the reassembly limits; ``reason`` names which (e.g. ``"checksum"``)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class TelemetryError(CodecError):
    """A status or metrics message is not telemetry we can use (malformed, too deep, wrong
    types); ``reason`` names which (e.g. ``"too_deep"``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TopicError(EmoError, ValueError):
    """A topic does not belong to the emo-mqtt topic grammar, or a topic part is invalid."""


class ConfigError(EmoError, ValueError):
    """A configuration value, scenario file or command-line option is invalid."""


class StateError(EmoError, ValueError):
    """A model state (dict of arrays) does not match the model: keys, shapes or dtypes."""


class UpdateRejected(EmoError, ValueError):
    """A client update cannot be aggregated (FedAvg); ``reason`` says why."""

    def __init__(self, reason: str, device: str | None = None) -> None:
        super().__init__(f"{device}: {reason}" if device else reason)
        self.reason = reason
        self.device = device


class TrainingDiverged(EmoError):
    """Training produced a non-finite loss or gradient (a learning rate too high for the
    model and data): the run stops and says where, rather than sending values no receiver
    accepts and waiting out timeouts."""


class BusError(EmoError):
    """The message bus failed: not connected, connection lost, broker refused us."""


class PublishTimeout(BusError, TimeoutError):
    """A publish was not acknowledged by the broker within its (size-scaled) deadline."""


class BrokerError(EmoError):
    """A broker could not be started, or stopped unexpectedly."""
