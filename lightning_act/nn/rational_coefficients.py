"""Initial coefficients of the GR-KAN rational, fitted once by ``scripts/fit_rational_init.py``.

Form (the one ``GroupRational`` evaluates): ``F(x) = P(x) / Q(x)`` with
``P(x) = a0 + a1 x + ... + a5 x^5`` and ``Q(x) = 1 + |b0| |x| + |b1| |x|^2 + |b2| |x|^3 + |b3| |x|^4``.
Least squares on 2001 uniform points of [-3, 3]; the max abs error there is given per target. A polynomial
target (the identity) ships its exact coefficients instead: a least-squares fit leaves ~1e-16 noise in the higher
powers, which outgrows the target at large ``|x|`` (``a5 = 1e-18`` beats ``x`` from ``|x|`` ~ 1e4). Numerators
are ``(a0, ..., a5)``, denominators ``(b0, ..., b3)``. Regenerate with ``python scripts/fit_rational_init.py``.
"""

from __future__ import annotations

# identity: max |F - f| on [-3, 3] = 0.000e+00
IDENTITY_NUMERATOR = (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
IDENTITY_DENOMINATOR = (0.0, 0.0, 0.0, 0.0)
# swish (x * sigmoid(x)): max |F - f| on [-3, 3] = 1.177e-06
SWISH_NUMERATOR = (3.0716875116837923e-07, 0.5000007786617003, 0.24999782023536202, 0.05326593025540184, 0.005802868836261501, 0.0002751735547775154)
SWISH_DENOMINATOR = (4.064616519922041e-06, 0.10652833929875283, 1.2474013247457166e-06, 0.000550191167664928)
# gelu (exact, erf form): max |F - f| on [-3, 3] = 3.705e-03
GELU_NUMERATOR = (-0.0021027407956739994, 0.499810307977608, 0.4132145196153974, 0.1410338635130472, 0.03132693054653728, 0.004028617789605652)
GELU_DENOMINATOR = (4.1488222730558085e-07, 0.2815217569101122, 0.0002888266041535003, 0.008019024445794342)

INIT_COEFFICIENTS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "identity": (IDENTITY_NUMERATOR, IDENTITY_DENOMINATOR),
    "swish": (SWISH_NUMERATOR, SWISH_DENOMINATOR),
    "gelu": (GELU_NUMERATOR, GELU_DENOMINATOR),
}
