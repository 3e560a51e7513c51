"""The data modules' argument checks: a bad value is one line at construction.

Unchecked, a NaN noise level or a zero ``std`` trains on non-finite inputs without a word, and a zero size or
rate fails at the first batch with a raw torch or numpy traceback far from the argument that caused it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from lightning_act.errors import ConfigError


def check_whole(name: str, value: Any, low: int | None, example: int, what: str = "a whole number") -> None:
    """``value`` is an int (not a bool) >= ``low`` (any int with ``low=None``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ConfigError(f"{name}={value!r} must be {what}{bound}; pass e.g. --data.{name} {example}")


def check_real(name: str, value: Any, low: float | None, example: float, above: bool = False, what: str = "") -> None:
    """``value`` is a finite number >= ``low`` (> ``low`` with ``above``; any finite number with ``low=None``)."""
    if low is None:
        bound, fits = "finite number", True
    else:
        bound = f"finite number {'>' if above else '>='} {low:g}"
        fits = isinstance(value, numbers.Real) and (value > low if above else value >= low)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (fits and math.isfinite(value)):
        raise ConfigError(f"{name}={value!r} must be a {bound}{what}; pass e.g. --data.{name} {example:g}")


def check_flag(name: str, value: Any) -> None:
    """``value`` is a bool: a string such as ``"no"`` would read as true."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false; pass e.g. --data.{name} true")


def check_loader_args(batch_size: Any, num_workers: Any, seed: Any, numpy_seed: bool = True) -> None:
    """The DataLoader's ``batch_size`` and ``num_workers`` and the split/shuffle ``seed`` (numpy's seeds are >= 0;
    a module seeding torch generators alone, ``numpy_seed=False``, takes any whole number, as torch does)."""
    check_whole("batch_size", batch_size, 1, 64)
    check_whole("num_workers", num_workers, 0, 4)
    check_whole("seed", seed, 0 if numpy_seed else None, 0)


def check_split_fractions(val_fraction: Any, test_fraction: Any, together: bool = True) -> None:
    """Validation and test shares of the examples: each in [0, 1), leaving some for training (with ``together``
    False their sum is left to the split, for sources that split off no test set: an image folder without test/)."""
    fractions = (val_fraction, test_fraction)
    if any(isinstance(f, bool) or not isinstance(f, numbers.Real) for f in fractions) or not (
        0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and (not together or val_fraction + test_fraction < 1.0)
    ):
        raise ConfigError(
            f"val_fraction={val_fraction!r} and test_fraction={test_fraction!r} must be in [0, 1) and sum to < 1; "
            "pass smaller --data.val_fraction / --data.test_fraction"
        )
