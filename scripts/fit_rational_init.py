"""Fit the initial GR-KAN rational coefficients shipped in ``lightning_act/nn/rational_coefficients.py``.

The rational is evaluated in exactly the form ``GroupRational`` uses (Yang & Wang 2024,
arXiv 2409.10594, with the denominator of the public rational_kat_cu kernels)::

    F(x) = P(x) / Q(x)
    P(x) = a0 + a1 x + a2 x^2 + a3 x^3 + a4 x^4 + a5 x^5
    Q(x) = 1 + |b0| |x| + |b1| |x|^2 + |b2| |x|^3 + |b3| |x|^4

Each target (Swish = x * sigmoid(x), exact-erf GELU) is fitted by scipy least squares on a uniform grid
over [-3, 3], starting from several deterministic points. A polynomial target (the identity) is not fitted: its
exact coefficients are kept (P(x) = x, Q(x) = 1), since least squares leaves ~1e-16 noise in the higher powers
that outgrows the target at large |x|. The coefficients are printed as Python literals to paste into
``rational_coefficients.py``.

Usage::

    python scripts/fit_rational_init.py
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import least_squares
from scipy.special import erf

FIT_RANGE = 3.0
GRID_POINTS = 2001
# A later start replaces an earlier one only if it lowers the max error by more than this: ties within float noise
# keep the earlier start.
SIGNIFICANT_IMPROVEMENT = 1e-12


def rational(x: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """P(x) / Q(x) in the absolute-value denominator form, float64."""
    p = np.polyval(numerator[::-1], x)
    ax = np.abs(x)
    b = np.abs(denominator)
    q = 1.0 + ax * (b[0] + ax * (b[1] + ax * (b[2] + ax * b[3])))
    return p / q


TARGETS = {
    "identity": lambda x: x,
    "swish": lambda x: x / (1.0 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))),
}


# Targets that are polynomials of degree <= 5: their exact numerators (a0..a5), with Q = 1. Fitted, the identity
# came out with a5 = 1.1e-18, a4 = 5e-17, ..., so F(x) was 1% off x at |x| = 1e4 and 100x off at 1e5.
POLYNOMIAL_TARGETS = {"identity": (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)}


def fit(target: str, extra_starts: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Return (numerator, denominator, max abs error on the grid): the exact coefficients of a polynomial target,
    else the best least-squares fit.

    Starts: the degree-5 polynomial fit with denominators 0, 0.01, 0.1, 1, plus ``extra_starts`` (flat arrays
    a0..a5, b0..b3).
    """
    x = np.linspace(-FIT_RANGE, FIT_RANGE, GRID_POINTS)
    y = TARGETS[target](x)
    if target in POLYNOMIAL_TARGETS:
        numerator, denominator = np.array(POLYNOMIAL_TARGETS[target]), np.zeros(4)
        return numerator, denominator, float(np.max(np.abs(rational(x, numerator, denominator) - y)))

    def residual(theta: np.ndarray) -> np.ndarray:
        return rational(x, theta[:6], theta[6:]) - y

    polynomial_start = np.polynomial.polynomial.polyfit(x, y, 5)
    starts = [np.concatenate([polynomial_start, np.zeros(4)])]
    for scale in (0.01, 0.1, 1.0):
        starts.append(np.concatenate([polynomial_start, np.full(4, scale)]))
    starts.extend(extra_starts or [])
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for start in starts:
        result = least_squares(residual, start, method="lm", xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=5000)
        numerator, denominator = result.x[:6], np.abs(result.x[6:])
        error = float(np.max(np.abs(rational(x, numerator, denominator) - y)))
        if best is None or error < best[2] - SIGNIFICANT_IMPROVEMENT:
            best = (numerator, denominator, error)
    assert best is not None
    return best


def scaled_start(numerator: np.ndarray, denominator: np.ndarray, scale: float) -> np.ndarray:
    """Coefficients of F(scale * x) / scale, given those of F (same rational form)."""
    return np.concatenate([numerator * scale ** (np.arange(6) - 1.0), denominator * scale ** np.arange(1.0, 5.0)])


GELU_SWISH_SCALE = 1.702  # GELU(x) ~ Swish(1.702 x), Hendrycks & Gimpel 2016 (arXiv 1606.08415)


def main() -> None:
    fits = {}
    for target in TARGETS:
        extra = [scaled_start(*fits["swish"][:2], GELU_SWISH_SCALE)] if target == "gelu" else None
        numerator, denominator, error = fits[target] = fit(target, extra)
        print(f"# {target}: max |F - f| on [-{FIT_RANGE:g}, {FIT_RANGE:g}] = {error:.3e}")
        print(f"{target.upper()}_NUMERATOR = ({', '.join(repr(float(v)) for v in numerator)})")
        print(f"{target.upper()}_DENOMINATOR = ({', '.join(repr(float(v)) for v in denominator)})")


if __name__ == "__main__":
    main()
