"""Hyper-parameter checks with messages that name the parameter and the loss."""

from __future__ import annotations

import math


def positive(loss: str, name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"loss '{loss}': {name} must be a finite number > 0, got {value!r}")
    return float(value)


def non_negative(loss: str, name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"loss '{loss}': {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def finite(loss: str, name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"loss '{loss}': {name} must be a finite number, got {value!r}")
    return float(value)


def in_range(loss: str, name: str, value: float, low: float, high: float) -> float:
    """low <= value < high."""
    finite(loss, name, value)
    if not low <= value < high:
        raise ValueError(f"loss '{loss}': {name} must be in [{low}, {high}), got {value!r}")
    return float(value)
