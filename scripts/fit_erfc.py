"""Fit the polynomial Q of the native kernel's vector GELU (fff_cpu_walk.h, ``gelu_vec``).

``erfc(a) = t * exp(-a^2 + Q(t))`` with ``t = 1 / (1 + a/2)`` for ``a`` in [0, 9.5]: Q of
degree 9 in ``t`` by least squares in float64 on a dense grid, reweighted 30 times towards the
largest errors (a cheap approach to minimax). Prints the float64 fit's largest relative error of
erfc and the coefficients as C++ float literals, lowest degree first.

Run: ``python scripts/fit_erfc.py`` (numpy and the standard library only; ~10 s).
"""

from __future__ import annotations

import math

import numpy as np

DEGREE = 9
A_MAX = 9.5
POINTS = 200_001
ROUNDS = 30


def fit() -> tuple[np.ndarray, float]:
    """``(coefficients (DEGREE+1,), largest relative error of erfc)``."""
    a = np.linspace(0.0, A_MAX, POINTS)
    t = 1.0 / (1.0 + a / 2.0)
    target = np.array([math.log(math.erfc(v)) for v in a]) + a * a - np.log(t)
    basis = np.vander(t, DEGREE + 1, increasing=True)
    coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
    for _ in range(ROUNDS):
        err = basis @ coef - target
        weight = 1.0 + 50.0 * np.abs(err) / np.abs(err).max()
        coef, *_ = np.linalg.lstsq(basis * weight[:, None], target * weight, rcond=None)
    return coef, float(np.abs(np.expm1(basis @ coef - target)).max())


def main() -> None:
    coef, worst = fit()
    print(f"largest relative error of erfc on [0, {A_MAX}] (float64): {worst:.3g}")
    print(", ".join(f"{c:.9e}f" for c in coef))


if __name__ == "__main__":
    main()
