"""Classical hyperspectral target detectors: SAM, MF, ACE and CEM (batched torch).

Formulas (x pixel spectrum, t target spectrum, μ and Σ background mean and covariance,
R the uncentred background autocorrelation; the baselines of Lekhak et al., arXiv
2602.10434; see Manolakis & Shaw, IEEE Signal Processing Magazine 2002, for the detectors):

* SAM  (Kruse et al. 1993): ``−arccos(xᵀt / (‖x‖ ‖t‖))`` (minus the angle, so higher = more target-like)
* MF:  ``w = Σ⁻¹(t−μ) / ((t−μ)ᵀΣ⁻¹(t−μ))``, score ``wᵀ(x−μ)``
* ACE: ``[(t−μ)ᵀΣ⁻¹(x−μ)]² / ([(t−μ)ᵀΣ⁻¹(t−μ)] · [(x−μ)ᵀΣ⁻¹(x−μ)])``
* CEM (Harsanyi 1993): ``R = XᵀX / N``, ``w = R⁻¹t / (tᵀR⁻¹t)``, score ``wᵀx``

Σ and R are estimated from *training* background pixels, never from the scene being scored,
and regularised with a relative ridge ``M + λ · (tr M / B) · I``. MF, ACE and CEM are invariant to
rescaling M, so this ridge is the same as shrinkage ``(1 − α) M + α (tr M / B) I`` with
``λ = α / (1 − α)``. All linear algebra runs in float64; scores are returned in the input dtype, or in float32
for an integer cube (raw ENVI counts: an integer score would truncate every score below 1 to 0).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import nn

DETECTOR_NAMES = ("SAM", "MF", "ACE", "CEM")
STATISTIC_BUFFERS = ("target", "mean", "covariance", "autocorrelation")


def score_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of ``x``'s scores: its own if floating point, else float32."""
    return x.dtype if x.is_floating_point() else torch.float32


def regularise(matrix: torch.Tensor, ridge: float) -> torch.Tensor:
    """``M + ridge · (tr M / B) · I``: a scale-free ridge that keeps M invertible with B ≳ N pixels."""
    bands = matrix.shape[-1]
    scale = torch.diagonal(matrix, dim1=-2, dim2=-1).sum(-1) / bands
    return matrix + ridge * scale * torch.eye(bands, dtype=matrix.dtype, device=matrix.device)


def background_covariance(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ and maximum-likelihood covariance Σ = (X−μ)ᵀ(X−μ)/N of ``pixels`` (N, B), in float64."""
    x = pixels.double()
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / x.shape[0]


def background_autocorrelation(pixels: torch.Tensor) -> torch.Tensor:
    """Uncentred autocorrelation R = XᵀX / N of ``pixels`` (N, B), in float64 (used by CEM)."""
    x = pixels.double()
    return x.T @ x / x.shape[0]


def sam_score(x: torch.Tensor, target: torch.Tensor, eps: float = 1e-300) -> torch.Tensor:
    """Minus the spectral angle between every pixel in ``x`` (..., B) and ``target`` (B,).

    The angle ``arccos(xᵀt / (‖x‖ ‖t‖))`` is evaluated as ``2·atan2(‖x̂ − t̂‖, ‖x̂ + t̂‖)`` on the unit
    vectors (Kahan), which equals it exactly in real arithmetic but stays accurate for small angles,
    where ``arccos`` of a rounded cosine loses half the digits.
    """
    x_unit = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(eps)
    t_unit = target.double() / target.double().norm().clamp_min(eps)
    angle = 2.0 * torch.atan2((x_unit - t_unit).norm(dim=-1), (x_unit + t_unit).norm(dim=-1))
    return (-angle).to(score_dtype(x))


def mf_score(x: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Matched filter ``wᵀ(x−μ)`` with ``w = Σ⁻¹(t−μ) / ((t−μ)ᵀΣ⁻¹(t−μ))``; 1 at x = t, 0 at x = μ."""
    d = target.double() - mean.double()
    cov_inv_d = torch.linalg.solve(covariance.double(), d)
    w = cov_inv_d / (d @ cov_inv_d)
    return ((x.double() - mean.double()) @ w).to(score_dtype(x))


def ace_score(
    x: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor, eps: float = 1e-300
) -> torch.Tensor:
    """Adaptive coherence estimator: squared cosine between t−μ and x−μ in the Σ⁻¹ metric, in [0, 1]."""
    d = target.double() - mean.double()
    centred = x.double() - mean.double()
    chol = torch.linalg.cholesky(covariance.double())
    whitened_d = torch.linalg.solve_triangular(chol, d.unsqueeze(-1), upper=False).squeeze(-1)
    whitened_x = torch.linalg.solve_triangular(chol, centred.reshape(-1, d.shape[0]).T, upper=False).T
    numerator = (whitened_x @ whitened_d) ** 2
    denominator = (whitened_d @ whitened_d) * (whitened_x * whitened_x).sum(-1)
    return (numerator / denominator.clamp_min(eps)).reshape(centred.shape[:-1]).to(score_dtype(x))


def cem_score(x: torch.Tensor, target: torch.Tensor, autocorrelation: torch.Tensor) -> torch.Tensor:
    """Constrained energy minimisation ``wᵀx`` with ``w = R⁻¹t / (tᵀR⁻¹t)``; 1 at x = t."""
    t = target.double()
    r_inv_t = torch.linalg.solve(autocorrelation.double(), t)
    w = r_inv_t / (t @ r_inv_t)
    return (x.double() @ w).to(score_dtype(x))


class ClassicalDetectors(nn.Module):
    """SAM, MF, ACE and CEM with background statistics fitted once from training pixels.

    Call :meth:`fit` with training background pixels (N, B) and the target spectrum (B,), then
    ``detectors(x)`` returns ``{"SAM": ..., "MF": ..., "ACE": ..., "CEM": ...}``, each a score per
    pixel of ``x`` (..., B), higher = more target-like. The statistics are buffers, so they move
    with ``.to(device)`` and are saved in ``state_dict``.

    Args:
        ridge: relative ridge λ added to Σ and R (see :func:`regularise`); 0 disables it.
    """

    def __init__(self, ridge: float = 1e-3) -> None:
        super().__init__()
        # NaN passes `ridge < 0` and inf makes every matrix inf: fit would then blame the data
        if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}; pass a small value such as 1e-3")
        self.ridge = float(ridge)
        self.register_buffer("target", torch.empty(0, dtype=torch.float64))
        self.register_buffer("mean", torch.empty(0, dtype=torch.float64))
        self.register_buffer("covariance", torch.empty(0, 0, dtype=torch.float64))
        self.register_buffer("autocorrelation", torch.empty(0, 0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    def fit(self, background_pixels: torch.Tensor, target: torch.Tensor) -> ClassicalDetectors:
        """Estimate μ, Σ + ridge and R + ridge from ``background_pixels`` (N, B); keep ``target`` (B,)."""
        if background_pixels.ndim != 2 or target.shape != background_pixels.shape[-1:]:
            raise ValueError(
                f"expected background pixels (N, B) and a target (B,), got {tuple(background_pixels.shape)} "
                f"and {tuple(target.shape)}; pass spectra with the same number of bands"
            )
        if background_pixels.shape[0] < 2:  # no mean or covariance to estimate: every score would be NaN
            raise ValueError(
                f"{background_pixels.shape[0]} background pixel(s); the background mean and covariance need 2 or more"
            )
        bad = int((~torch.isfinite(background_pixels)).sum()) + int((~torch.isfinite(target)).sum())
        if bad:
            raise ValueError(
                f"{bad} NaN/inf values in the background pixels or target spectrum; replace or drop those pixels "
                "before fitting (a single one makes Σ and R non-finite)"
            )
        mean, covariance = background_covariance(background_pixels)
        covariance = regularise(covariance, self.ridge)
        autocorrelation = regularise(background_autocorrelation(background_pixels), self.ridge)
        pixels, bands = background_pixels.shape
        eigen = {}
        for name, matrix, rank_bound in (
            ("covariance Σ", covariance, pixels - 1),  # N centred pixels span at most N − 1 directions
            ("autocorrelation R", autocorrelation, pixels),
        ):
            # The scores solve with it (ACE by Cholesky): say so here, not mid-score. Cholesky alone succeeds on
            # round-off for a matrix singular by construction, so test the rank bound without a ridge and the numerical
            # rank (numpy's matrix_rank tolerance) too.
            values, vectors = torch.linalg.eigh(matrix)
            if (
                (self.ridge == 0 and rank_bound < bands)
                or not values[0] > bands * torch.finfo(values.dtype).eps * values[-1]
                or int(torch.linalg.cholesky_ex(matrix).info)
            ):
                if not float(torch.diagonal(matrix).sum()) > 0:  # every pixel the same: the ridge scales with tr M
                    fix = "pass background pixels that vary (they are all the same, which no ridge helps)"
                else:
                    fix = (f"pass {'ridge > 0 (e.g. 1e-3)' if self.ridge == 0 else 'a larger ridge (e.g. 1e-3)'} or "
                           "background pixels that vary in every band")
                raise ValueError(
                    f"the background {name} is singular (ridge={self.ridge}; {pixels} pixels, {bands} bands: too few "
                    f"pixels, a constant band or identical pixels); {fix}"
                )
            eigen[name] = values, vectors
        for undefined, equals, direction, name in (
            ("MF and ACE", "the background mean", target.double() - mean, "covariance Σ"),
            ("SAM and CEM", "zero", target.double(), "autocorrelation R"),
        ):
            values, vectors = eigen[name]
            if not float(((vectors.T @ direction) ** 2 / values).sum()) > 0:  # dᵀM⁻¹d, their weights' 0/0
                raise ValueError(
                    f"the target spectrum equals {equals}, so {undefined} are undefined (0/0); "
                    "pass the spectrum of the target material"
                )
        self.target = target.detach().double().clone()
        self.mean = mean
        self.covariance = covariance
        self.autocorrelation = autocorrelation
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ClassicalDetectors:
        # .half(), .to(bfloat16) and Lightning's "16-true"/"bf16-true" cast every floating buffer: keep the fitted
        # statistics in float64 (in half precision Σ of raw counts overflows, and the solves lose most digits) and
        # only follow the device.
        statistics = {name: getattr(self, name) for name in STATISTIC_BUFFERS}
        super()._apply(fn, recurse)
        for name, original in statistics.items():
            setattr(self, name, original.to(device=getattr(self, name).device))
        return self

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # type: ignore[override]
        # The buffers are empty until fit(); take the saved shapes so a fitted state loads into a new module.
        for name in STATISTIC_BUFFERS:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.fitted:
            raise RuntimeError("ClassicalDetectors.fit(background_pixels, target) must be called before scoring")
        return {
            "SAM": sam_score(x, self.target),
            "MF": mf_score(x, self.target, self.mean, self.covariance),
            "ACE": ace_score(x, self.target, self.mean, self.covariance),
            "CEM": cem_score(x, self.target, self.autocorrelation),
        }

    def extra_repr(self) -> str:
        return f"ridge={self.ridge:g}, bands={self.mean.numel()}"
