"""The algorithms a fleet runs, as an enum whose properties say what each one involves.

Code asks ``algorithm.uses_overlays`` or ``algorithm.is_split`` instead of comparing
strings: adding an algorithm means adding a member and its properties here.
"""

from __future__ import annotations

from enum import StrEnum

from emo_mqtt.errors import ConfigError

__all__ = ["Algorithm"]


class Algorithm(StrEnum):
    """One algorithm of a scenario (its value is the name used in files and on the wire)."""

    FL = "fl"
    SFL = "sfl"
    SFL_V1 = "sfl_v1"
    EMO = "emo"
    EMO_ALL = "emo_all"
    #: Ablation of the controller: every sample, every batch, int8; no signals.
    EMO_INT8 = "emo_int8"
    #: Ablation of the controller: a fixed share of samples at a fixed precision
    #: (``[controller] fixed_share`` / ``fixed_precision``); no signals.
    EMO_FIXED = "emo_fixed"

    @classmethod
    def parse(cls, value: str) -> Algorithm:
        """The member named ``value``; :class:`ConfigError` naming the known ones otherwise."""
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(a.value for a in cls)
            raise ConfigError(f"unknown algorithm {value!r}; use one of {known}") from None

    @property
    def uses_overlays(self) -> bool:
        """FL plus overlays that train on the devices' activations (EMO)."""
        return self in (
            Algorithm.EMO,
            Algorithm.EMO_ALL,
            Algorithm.EMO_INT8,
            Algorithm.EMO_FIXED,
        )

    @property
    def is_split(self) -> bool:
        """SplitFed: devices hold the trunk, the server the head, per-batch round trips."""
        return self in (Algorithm.SFL, Algorithm.SFL_V1)

    @property
    def head_per_device(self) -> bool:
        """SplitFed V1: a server-side head copy per device, averaged each round."""
        return self is Algorithm.SFL_V1

    @property
    def controlled(self) -> bool:
        """Activation traffic set by the convergence controller (when it is enabled)."""
        return self is Algorithm.EMO

    @property
    def sends_everything(self) -> bool:
        """EMO with the controller off: every activation, fp32."""
        return self is Algorithm.EMO_ALL

    @property
    def fixed_rule(self) -> bool:
        """EMO with a fixed activation rule and no convergence signal (the controller's
        ablations: ``emo_int8``, ``emo_fixed``)."""
        return self in (Algorithm.EMO_INT8, Algorithm.EMO_FIXED)
