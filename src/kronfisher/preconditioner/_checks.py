"""Cheap checks the preconditioner runs on gradients, curvature and loaded state."""

from __future__ import annotations

import math
import numbers
from typing import TypeVar

import torch
from torch import Tensor

_LOW = (torch.float16, torch.bfloat16)

__all__ = ["nonfinite_names", "grad_matrix_shape", "typed_curvature", "check_positive_int",
           "check_damping", "check_options", "checked_options", "as_int", "as_float",
           "KL_CLIP_MODES"]

KL_CLIP_MODES = ("lr2", "authors")

C = TypeVar("C")


def nonfinite_names(named: list[tuple[str, Tensor]]) -> list[str]:
    """Names of the tensors with a NaN or Inf entry, usually from one pass and one sync.

    A sum with a NaN or ±Inf term is never finite, so finite sums of all tensors prove
    every entry finite (float16/bfloat16 summed in float32). Only a tensor whose sum is
    not finite is then checked entrywise: its sum may just have overflowed. (On the CPU a
    sum is far cheaper than ``torch._foreach_norm(·, inf)``: 0.28 vs 20 ms on the MNIST
    auto-encoder, ``python benchmarks/check_cost.py --threads 1``, docs/reliability.md.)
    """
    if not named:
        return []
    sums = [t.sum(dtype=torch.float32) if t.dtype in _LOW else t.sum() for _, t in named]
    if len({s.device for s in sums}) == 1 and bool(torch.isfinite(torch.stack(sums)).all()):
        return []
    return [name for (name, t), s in zip(named, sums)
            if not bool(torch.isfinite(s)) and not bool(torch.isfinite(t).all())]


def grad_matrix_shape(s) -> tuple[int, int]:
    """(d_g, d_a) of a registered layer's gradient matrix (its adapter's layout)."""
    return s.adapter.layout.shape


def typed_curvature(state, kind: type[C], owner: str, kind_name: str) -> C | None:
    """A layer's curvature (None before the first update), checked to be a ``kind``.

    Args:
        state: the layer's ``LayerState``.
        kind: the class this preconditioner keeps its curvature as.
        owner: who keeps the curvature, for the message, e.g. "ExactNG's".
        kind_name: the expected kind in words, for the message, e.g. "dense Tensor".

    Raises:
        TypeError: the state holds another kind of curvature (not one of ours).
    """
    c = state.curvature
    if c is not None and not isinstance(c, kind):
        raise TypeError(
            f"layer {state.name!r}: {owner} curvature must be a {kind_name}, got"
            f" {type(c).__name__}"
        )
    return c


def as_int(name: str, v, minimum: int = 1) -> int:
    """``v`` as a Python int (numpy integers accepted).

    Raises:
        ValueError: ``v`` is not an integer >= ``minimum`` (``True``/``False`` refused).
    """
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def as_float(name: str, v, *, low: float = 0.0, low_open: bool = False,
             high: float | None = None, high_open: bool = True) -> float:
    """``v`` as a finite Python float within the bounds (numpy scalars accepted).

    Raises:
        ValueError: ``v`` is not a finite real number in the range (``True``/``False``
            refused: a flag is not a number).
    """
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v))
    if ok:
        f = float(v)
        ok = (f > low if low_open else f >= low) and (
            high is None or (f < high if high_open else f <= high))
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = "∞)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {lo}, {hi}, got {v!r}")
    return f


def check_positive_int(name: str, v) -> None:
    """Raise ValueError unless ``v`` is an integer >= 1 (``name`` is the argument's name)."""
    as_int(name, v)


def check_damping(d) -> float:
    """``d`` as a float.

    Raises:
        ValueError: ``d`` is not a finite number >= 0 (``True``/``False`` refused).
    """
    if isinstance(d, bool) or not isinstance(d, numbers.Real) or not (
            math.isfinite(float(d)) and float(d) >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {d!r}")
    return float(d)


EMA_COUNTERS = ("updates", "steps")


def checked_options(*, ema_decay, cov_update_freq, inv_update_freq, kl_clip, kl_clip_mode,
                    lr, nonfinite: str = "skip", ema_counter: str = "updates") -> dict:
    """The Preconditioner constructor's schedule and clipping arguments, checked.

    The same checks run on a loaded state_dict's hyper-parameters. Numbers come back as
    Python ints and floats (numpy scalars are accepted, flags are not numbers), so that a
    state_dict holds only plain types.

    Raises:
        ValueError: naming the first argument out of its range (see ``Preconditioner``).
    """
    out: dict[str, object] = {"cov_update_freq": as_int("cov_update_freq", cov_update_freq),
           "inv_update_freq": as_int("inv_update_freq", inv_update_freq),
           "ema_decay": as_float("ema_decay", ema_decay, high=1.0)}
    if ema_counter not in EMA_COUNTERS:
        raise ValueError(f"ema_counter must be one of {EMA_COUNTERS}, got {ema_counter!r}")
    if kl_clip_mode not in KL_CLIP_MODES:
        raise ValueError(f"kl_clip_mode must be one of {KL_CLIP_MODES}, got {kl_clip_mode!r}")
    out["kl_clip"] = None if kl_clip is None else as_float("kl_clip (or None)", kl_clip,
                                                           low_open=True)
    out["lr"] = None if lr is None else as_float("lr (or None)", lr, low_open=True)
    if out["kl_clip"] is not None and kl_clip_mode == "lr2" and out["lr"] is None:
        raise ValueError("kl_clip in mode 'lr2' needs the optimizer's lr > 0")
    if nonfinite not in ("skip", "raise"):
        raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
    out.update(ema_counter=ema_counter, kl_clip_mode=kl_clip_mode)
    return out


def check_options(*, ema_decay: float, cov_update_freq: int, inv_update_freq: int,
                  kl_clip: float | None, kl_clip_mode: str, lr: float | None,
                  nonfinite: str, ema_counter: str = "updates") -> None:
    """Check the Preconditioner constructor's schedule and clipping arguments.

    Raises:
        ValueError: naming the first argument out of its range (see :func:`checked_options`).
    """
    checked_options(ema_decay=ema_decay, cov_update_freq=cov_update_freq,
                    inv_update_freq=inv_update_freq, kl_clip=kl_clip,
                    kl_clip_mode=kl_clip_mode, lr=lr, nonfinite=nonfinite,
                    ema_counter=ema_counter)
