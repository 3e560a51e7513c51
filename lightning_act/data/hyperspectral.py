"""Hyperspectral target-detection data: synthetic scenes by default, ENVI or MATLAB cubes on request.

Three layers:

* :func:`make_synthetic_scenes` - scene crops whose background is a per-pixel mixture of smooth
  endmember spectra (abundances from smooth random spatial fields), with illumination variation,
  band-dependent noise, man-made clutter and a handful of small, partly sub-pixel targets mixed in
  at their fractional coverage. Deterministic for a given seed.
* :func:`read_envi`, :func:`read_mat`, :func:`read_mask`, :func:`load_scene` - readers for the
  formats users have: an ENVI header + raw cube (BSQ/BIL/BIP, read with the maintained ``spectral``
  package) and MATLAB ``.mat`` cubes with a ground-truth mask (``scipy.io.loadmat``).
* :class:`HyperspectralDataModule` - pixels as samples, split **by scene** (or by crop of a loaded
  cube) into train/val/test, standardised per band with training statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from scipy import ndimage
from torch.utils.data import TensorDataset

from lightning_act.data.checks import check_loader_args, check_real, check_split_fractions, check_whole
from lightning_act.data.splits import SplitDataModule
from lightning_act.errors import ConfigError, DataFormatError, DataNotFoundError

ENVI_INTERLEAVES = ("bsq", "bil", "bip")


@dataclass
class HyperspectralScene:
    """One scene crop: ``cube`` (H, W, B) float32 and binary target ``mask`` (H, W).

    Synthetic scenes also carry the per-pixel target ``abundance`` (fraction of the pixel covered
    by a target), the per-pixel ``clutter_abundance`` (covered by a confuser) and the pure
    ``target_spectrum``.
    """

    name: str
    cube: np.ndarray
    mask: np.ndarray
    wavelengths: np.ndarray | None = None
    abundance: np.ndarray | None = None
    clutter_abundance: np.ndarray | None = None
    target_spectrum: np.ndarray | None = None


# --------------------------------------------------------------------------- synthetic scenes


def _bump(wl: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((wl - centre) / width) ** 2)


def _rise(wl: np.ndarray, centre: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(wl - centre) / width))


def _water_absorption(wl: np.ndarray, depth: float) -> np.ndarray:
    """Multiplicative liquid-water features at 970, 1200, 1450 and 1940 nm."""
    return 1.0 - depth * (
        0.12 * _bump(wl, 970, 35) + 0.2 * _bump(wl, 1200, 50) + 0.65 * _bump(wl, 1450, 70) + 0.85 * _bump(wl, 1940, 80)
    )


def endmember_library(wavelengths: np.ndarray) -> dict[str, np.ndarray]:
    """Smooth reflectance spectra (0-1) of common background materials, shaped after their known
    features: chlorophyll green peak and red edge, soil brightening, cellulose and carbonate
    absorptions, dark water."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    vegetation = (
        0.03 + 0.07 * _bump(wl, 550, 30) + 0.45 * _rise(wl, 715, 15) * (1 - 0.55 * _rise(wl, 1300, 150))
    ) * _water_absorption(wl, 0.9)
    soil = (0.08 + 0.25 * _rise(wl, 900, 350) - 0.05 * _rise(wl, 2100, 150)) * (
        _water_absorption(wl, 0.35) - 0.1 * _bump(wl, 2200, 30)
    )
    dry_vegetation = (0.06 + 0.3 * _rise(wl, 700, 150) - 0.08 * _bump(wl, 2100, 40)) * _water_absorption(wl, 0.4)
    gravel = 0.18 + 0.06 * (wl - 400) / 2100 - 0.05 * _bump(wl, 900, 120) - 0.08 * _bump(wl, 2330, 30)
    water = 0.005 + 0.06 * np.exp(-(wl - 400) / 300)
    spectra = {"vegetation": vegetation, "soil": soil, "dry_vegetation": dry_vegetation, "gravel": gravel, "water": water}
    return {name: np.clip(s, 0.005, 1.0) for name, s in spectra.items()}


def target_library_spectrum(wavelengths: np.ndarray) -> np.ndarray:
    """A green plastic object (e.g. a PFM-1-like mine): vegetation-like in the visible, with a
    shifted red edge and the C-H absorptions of plastics at 1210, 1730, 2160 and 2310 nm."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    spectrum = (0.05 + 0.09 * _bump(wl, 545, 35) + 0.3 * _rise(wl, 680, 25)) * (
        1
        - 0.3 * _bump(wl, 1210, 25)
        - 0.45 * _bump(wl, 1730, 30)
        - 0.2 * _bump(wl, 2160, 40)
        - 0.5 * _bump(wl, 2310, 35)
    )
    return np.clip(spectrum, 0.005, 1.0)


def clutter_library_spectra(wavelengths: np.ndarray) -> dict[str, np.ndarray]:
    """Man-made confusers that share one half of the target's signature: brown plastic (the same C-H
    absorptions, no green) and green-painted metal (the same green, no C-H absorptions)."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    plastic_absorption = (
        1 - 0.3 * _bump(wl, 1210, 25) - 0.45 * _bump(wl, 1730, 30) - 0.2 * _bump(wl, 2160, 40) - 0.5 * _bump(wl, 2310, 35)
    )
    brown_plastic = (0.06 + 0.22 * _rise(wl, 620, 60)) * plastic_absorption
    green_metal = 0.05 + 0.09 * _bump(wl, 545, 35) + 0.22 * _rise(wl, 700, 40) - 0.04 * _rise(wl, 1600, 300)
    return {"brown_plastic": np.clip(brown_plastic, 0.005, 1.0), "green_metal": np.clip(green_metal, 0.005, 1.0)}


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian random field with unit variance and correlation length ~sigma pixels."""
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma, mode="wrap")
    return (field - field.mean()) / field.std()


def _disk_coverage(size: int, centre: tuple[float, float], radius: float, supersample: int = 8) -> np.ndarray:
    """Fraction of each pixel covered by a disk, by supersampling the pixel grid."""
    coverage = np.zeros((size, size))
    r0, c0 = centre
    lo_r, hi_r = max(0, int(r0 - radius) - 1), min(size, int(r0 + radius) + 2)
    lo_c, hi_c = max(0, int(c0 - radius) - 1), min(size, int(c0 + radius) + 2)
    offsets = (np.arange(supersample) + 0.5) / supersample
    for r in range(lo_r, hi_r):
        for c in range(lo_c, hi_c):
            dr = r + offsets[:, None] - r0
            dc = c + offsets[None, :] - c0
            coverage[r, c] = np.mean(dr**2 + dc**2 <= radius**2)
    return coverage


def make_synthetic_scene(
    index: int,
    seed: int = 0,
    size: int = 64,
    num_bands: int = 64,
    targets_per_scene: tuple[int, int] = (12, 24),
    clutter_per_scene: tuple[int, int] = (20, 40),
    target_radius: tuple[float, float] = (0.3, 1.4),
    clutter_radius: tuple[float, float] = (0.35, 2.5),
    label_abundance: float = 0.25,
    noise_std: float = 0.01,
) -> HyperspectralScene:
    """One synthetic scene crop (see :func:`make_synthetic_scenes`), seeded by ``(seed, index)``."""
    if size < 8:
        raise ConfigError(f"synthetic scenes need size >= 8 pixels, got {size}; pass --data.scene_size 8 or more")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    wavelengths = np.linspace(400.0, 2500.0, num_bands)
    library = endmember_library(wavelengths)
    names = sorted(library)
    chosen = sorted(rng.choice(len(names), size=int(rng.integers(3, len(names) + 1)), replace=False))
    # Scene-specific material variants: a smooth +-5 % multiplicative distortion per endmember.
    endmembers = np.stack(
        [library[names[k]] * (1 + 0.05 * np.interp(wavelengths, np.linspace(400, 2500, 6), rng.uniform(-1, 1, 6)))
         for k in chosen]
    )
    # Abundances: softmax of smooth random fields, i.e. patches of materials with mixed borders.
    sharpness = rng.uniform(2.0, 4.0)
    fields = np.stack([_smooth_field(rng, size, rng.uniform(size / 16, size / 6)) for _ in chosen])
    weights = np.exp(sharpness * fields)
    abundances = weights / weights.sum(0, keepdims=True)
    reflectance = np.einsum("khw,kb->hwb", abundances, endmembers)
    # Intra-class variability: per-pixel smooth spectral perturbations (background is not low rank).
    basis = np.stack([np.cos(np.pi * j * (wavelengths - 400) / 2100) for j in range(1, 4)])
    reflectance *= 1 + 0.03 * np.einsum("hwj,jb->hwb", rng.normal(size=(size, size, 3)), basis)

    # Targets: disks of sub-pixel to few-pixel radius, mixed in at their fractional coverage.
    target_spectrum = target_library_spectrum(wavelengths)
    abundance = np.zeros((size, size))
    peak_pixels: list[tuple[int, int]] = []
    centres: list[np.ndarray] = []
    num_targets = int(rng.integers(targets_per_scene[0], targets_per_scene[1] + 1))
    for _ in range(200 * num_targets):  # rejection sampling; a small scene may hold fewer targets
        if len(centres) == num_targets:
            break
        centre = rng.uniform(3, size - 3, size=2)
        if any(np.hypot(*(centre - other)) < 6 for other in centres):
            continue
        centres.append(centre)
        coverage = _disk_coverage(size, (centre[0], centre[1]), rng.uniform(*target_radius))
        # Each object differs: brightness, a smooth spectral distortion, and a coat of local dust (soil).
        distortion = 1 + 0.1 * np.interp(wavelengths, np.linspace(400, 2500, 6), rng.uniform(-1, 1, 6))
        dust = rng.uniform(0.0, 0.4)
        variant = rng.uniform(0.8, 1.2) * ((1 - dust) * target_spectrum * distortion + dust * library["soil"])
        reflectance = (1 - coverage[..., None]) * reflectance + coverage[..., None] * variant
        abundance = np.maximum(abundance, coverage)
        peak_pixels.append(np.unravel_index(np.argmax(coverage), coverage.shape))

    # Clutter: objects of the confuser materials, labelled background.
    clutter = list(clutter_library_spectra(wavelengths).values())
    clutter_abundance = np.zeros((size, size))
    for _ in range(int(rng.integers(clutter_per_scene[0], clutter_per_scene[1] + 1))):
        centre = rng.uniform(2, size - 2, size=2)
        coverage = _disk_coverage(size, (centre[0], centre[1]), rng.uniform(*clutter_radius))
        coverage = coverage * (abundance == 0)
        material = clutter[int(rng.integers(len(clutter)))] * rng.uniform(0.8, 1.2)
        reflectance = (1 - coverage[..., None]) * reflectance + coverage[..., None] * material
        clutter_abundance = coverage + (1 - coverage) * clutter_abundance

    # Illumination: scene gain, smooth shading (topography) and a residual-atmosphere spectral tilt.
    gain = rng.uniform(0.7, 1.2) * np.clip(1 + 0.15 * _smooth_field(rng, size, size / 8), 0.5, 1.5)
    tilt = 1 + rng.uniform(-0.1, 0.1) * (wavelengths - 1450) / 1050
    radiance = reflectance * gain[..., None] * tilt
    # Sensor noise, stronger in the atmospheric water bands where little light arrives.
    band_noise = noise_std * (1 + 4 * (_bump(wavelengths, 1400, 40) + _bump(wavelengths, 1900, 50)))
    cube = radiance + rng.normal(size=radiance.shape) * band_noise

    mask = abundance >= label_abundance
    for r, c in peak_pixels:
        mask[r, c] = True
    return HyperspectralScene(
        name=f"synthetic-{seed}-{index}",
        cube=cube.astype(np.float32),
        mask=mask,
        wavelengths=wavelengths,
        abundance=abundance.astype(np.float32),
        clutter_abundance=clutter_abundance.astype(np.float32),
        target_spectrum=target_spectrum.astype(np.float32),
    )


def make_synthetic_scenes(num_scenes: int = 8, seed: int = 0, **scene_kwargs) -> list[HyperspectralScene]:
    """Independent synthetic scene crops, deterministic for a given ``seed``.

    Background: a per-pixel mixture of 3-5 smooth endmember spectra (vegetation, soil, dry
    vegetation, gravel, water) with abundances from smooth random fields, scene-specific material
    variants and per-pixel spectral variability; illumination varies per scene (gain, tilt) and
    per pixel (shading); noise is Gaussian and larger in the 1400/1900 nm water bands. Targets:
    12-24 disks per scene (at least 6 px apart, fewer if a small scene has no room) of radius
    0.3-1.4 px (mostly sub-pixel) with a plastic spectrum, mixed into the background at each
    pixel's covered fraction. Confusers: 20-40 objects of radius 0.35-2.5 px of the clutter
    materials (see :func:`clutter_library_spectra`), labelled background; they cover a few percent
    of every scene, so the background statistics the detectors estimate contain them. A pixel is
    labelled target when at least ``label_abundance`` of it is covered; each target's most-covered
    pixel is always labelled. Keyword arguments go to
    :func:`make_synthetic_scene`.
    """
    return [make_synthetic_scene(i, seed=seed, **scene_kwargs) for i in range(num_scenes)]


# --------------------------------------------------------------------------- file readers


def _existing(path: str | Path, what: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"{what} '{p}' not found; pass {flag} with the path of an existing file")
    return p


def read_envi(
    header_path: str | Path,
    image_path: str | Path | None = None,
    dtype: np.dtype | type | None = np.float32,
    refuse_ignored: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ENVI cube (BSQ, BIL or BIP) as (H, W, B) ``dtype``, plus its wavelengths if the header has them.

    The raw file is found next to the header (same stem, no extension or ``.img``/``.dat``/
    ``.raw``/``.bsq``/...) unless ``image_path`` is given. Reading uses ``spectral.envi``.
    ``dtype=None`` keeps the file's own data type: a mask's class labels stay exact (float32 holds
    integers exactly only up to 2**24). With ``refuse_ignored``, pixels holding the header's
    ``data ignore value`` (no-data fill) are refused like NaN pixels (:func:`require_ignored_absent`).
    """
    import spectral
    from spectral.io import envi

    header = _existing(header_path, "ENVI header", "--data.path")
    try:
        meta = envi.read_envi_header(str(header))
    except Exception as error:  # spectral raises several unrelated types for malformed headers
        raise DataFormatError(f"ENVI header '{header}' cannot be parsed ({error}); pass a valid ENVI .hdr file") from error
    interleave = str(meta.get("interleave", "")).strip().lower()
    if interleave not in ENVI_INTERLEAVES:
        raise DataFormatError(
            f"ENVI header '{header}' has interleave '{meta.get('interleave')}'; set 'interleave' to one of bsq, bil, bip"
        )
    byte_order = str(meta.get("byte order", "0")).strip()
    if byte_order not in ("0", "1"):  # spectral reads any value but 0 as big-endian
        raise DataFormatError(
            f"ENVI header '{header}' has byte order '{byte_order}'; set 'byte order' to 0 (little-endian) or 1 "
            "(big-endian)"
        )
    if str(meta.get("file type", "")).strip().lower() == "envi spectral library":  # spectral returns no image for it
        raise DataFormatError(
            f"ENVI header '{header}' is an ENVI spectral library (a list of spectra), not an image cube; pass the "
            "cube's or the mask's .hdr"
        )
    if image_path is not None:
        image_path = _existing(image_path, "ENVI data file", "--data.path next to its header")
    try:
        image = envi.open(str(header), None if image_path is None else str(image_path))
    except envi.EnviDataFileNotFoundError as error:
        raise DataNotFoundError(
            f"ENVI data file for header '{header}' not found; put the raw cube next to it with the same name"
        ) from error
    except Exception as error:  # size mismatch, missing keys, unsupported data type
        raise DataFormatError(f"ENVI cube '{header}' cannot be read ({error}); check the header against the data file") from error
    # spectral refuses a data file that is too short but reads one that is too long: the extra bytes
    # mean the header's size, data type or offset is wrong, and with BIP every spectrum would be shifted.
    expected = int(image.offset) + image.nrows * image.ncols * image.nbands * int(image.sample_size)
    actual = Path(image.filename).stat().st_size
    if actual != expected:
        raise DataFormatError(
            f"ENVI data file '{image.filename}' has {actual} bytes but header '{header}' implies {expected} "
            f"({image.nrows} lines x {image.ncols} samples x {image.nbands} bands x {image.sample_size} bytes + "
            f"{image.offset} header offset); fix 'samples', 'lines', 'bands', 'data type' or 'header offset' in the header"
        )
    if np.dtype(image.dtype).kind == "c":  # data types 6 and 9: a float cast would drop the imaginary part silently
        raise DataFormatError(f"ENVI cube '{header}' is complex; pass real-valued data (e.g. its magnitude)")
    try:
        cube = np.asarray(image.load(dtype=image.dtype if dtype is None else dtype))
    except Exception as error:
        raise DataFormatError(f"ENVI cube '{header}' cannot be read ({error}); check the header against the data file") from error
    if image.interleave != {"bsq": spectral.BSQ, "bil": spectral.BIL, "bip": spectral.BIP}[interleave]:
        # spectral matches only 'bil'/'BIL'/'bip'/'BIP' and reads another spelling ('Bip') as BSQ: undo its reshape
        cube = _reorder_read_as_bsq(cube, interleave)
    require_finite(cube, image.filename)
    if refuse_ignored and "data ignore value" in meta:
        require_ignored_absent(cube, meta["data ignore value"], header, image.filename)
    wavelengths = _envi_wavelengths(meta, header)
    if wavelengths is not None and len(wavelengths) != cube.shape[-1]:  # each band's wavelength would be another's
        raise DataFormatError(
            f"ENVI header '{header}' lists {len(wavelengths)} wavelengths for {cube.shape[-1]} bands; fix its "
            "'wavelength' list or 'bands'"
        )
    return cube, wavelengths


def _reorder_read_as_bsq(cube: np.ndarray, interleave: str) -> np.ndarray:
    """The (H, W, B) cube of a ``bil``/``bip`` file that was read as BSQ: the same values back in file order, then
    reshaped by the declared interleave."""
    lines, samples, bands = cube.shape
    in_file_order = cube.transpose(2, 0, 1).reshape(-1)
    if interleave == "bip":
        return in_file_order.reshape(lines, samples, bands)
    return in_file_order.reshape(lines, bands, samples).transpose(0, 2, 1)


def require_ignored_absent(cube: np.ndarray, ignore_value: str, header: Path, path: str | Path) -> None:
    """Refuse pixels holding the header's ``data ignore value`` (a no-data fill such as -9999, e.g. a border around
    the swath), like :func:`require_finite` refuses NaN: read as spectra they would dominate the band statistics."""
    value = _ignore_value(ignore_value, header)
    ignored = cube == np.asarray(value).astype(cube.dtype)
    if ignored.any():
        where = np.argwhere(ignored)[0]
        raise DataFormatError(
            f"'{path}' has {int(ignored.sum())} values equal to its header's data ignore value {value:g} (first at "
            f"line {where[0]}, sample {where[1]}); crop the no-data pixels out (or replace them) before loading"
        )


def _ignore_value(ignore_value: str, header: Path) -> float:
    """The header's ``data ignore value`` as a number; one line when it is not one."""
    try:
        return float(ignore_value)
    except (TypeError, ValueError):
        raise DataFormatError(
            f"ENVI header '{header}' has a 'data ignore value' that is not a number ({ignore_value!r}); write one "
            "number or remove it"
        ) from None


def _envi_wavelengths(meta: dict, header: Path) -> np.ndarray | None:
    """The header's ``wavelength`` list as float64 numbers, None without one; one line when it holds other things."""
    if "wavelength" not in meta:
        return None
    try:
        return np.atleast_1d(np.asarray(meta["wavelength"], dtype=np.float64))
    except (TypeError, ValueError) as error:  # a trailing comma, '{}', units such as '400nm'
        raise DataFormatError(
            f"ENVI header '{header}' has a 'wavelength' field that is not a list of numbers ({error}); write it as "
            "'wavelength = {400.0, 410.0, ...}', one number per band, or remove it"
        ) from None


def require_finite(cube: np.ndarray, path: str | Path) -> None:
    """Refuse NaN/inf values: one line naming the file, how many, the first pixel and the fix.

    A single NaN pixel would otherwise surface much later as a non-converging eigendecomposition
    in the detectors' covariance or a NaN loss.
    """
    bad = ~np.isfinite(cube)
    if bad.any():
        where = np.argwhere(bad)[0]
        pixel = f"line {where[0]}, sample {where[1]}" if cube.ndim == 3 else f"index {tuple(int(i) for i in where)}"
        raise DataFormatError(
            f"'{path}' has {int(bad.sum())} NaN/inf values (first at {pixel}); replace them (e.g. with the band "
            "median or neighbouring pixels) or crop the bad pixels out before loading"
        )


def read_mat(path: str | Path, key: str | None = None, ndim: int = 3) -> np.ndarray:
    """Read one array from a MATLAB ``.mat`` file: variable ``key``, or the only ``ndim``-D numeric one."""
    import scipy.sparse
    from scipy.io import loadmat

    file = _existing(path, "MATLAB file", "--data.path")
    try:
        contents = loadmat(str(file))
    except NotImplementedError as error:  # v7.3 files are HDF5
        raise DataFormatError(f"MATLAB file '{file}' is v7.3 (HDF5); re-save it with save(..., '-v7')") from error
    except Exception as error:
        raise DataFormatError(f"MATLAB file '{file}' cannot be read ({error}); pass a valid .mat file") from error
    # MATLAB's sparse() (natural for a mostly-zero mask) comes back as a scipy.sparse matrix
    contents = {k: v.toarray() if scipy.sparse.issparse(v) else v for k, v in contents.items()}
    arrays = {k: v for k, v in contents.items() if not k.startswith("__") and isinstance(v, np.ndarray)}
    if key is not None:
        if key not in arrays:
            raise DataFormatError(f"MATLAB file '{file}' has no variable '{key}'; use one of {sorted(arrays)}")
        chosen = arrays[key]
        if not np.issubdtype(chosen.dtype, np.number):
            raise DataFormatError(
                f"MATLAB variable '{key}' of '{file}' holds {chosen.dtype}, not numbers; name the right one with "
                "--data.cube_key / --data.mask_key"
            )
    else:
        candidates = [k for k, v in arrays.items() if v.ndim == ndim and np.issubdtype(v.dtype, np.number)]
        if len(candidates) != 1:
            raise DataFormatError(
                f"MATLAB file '{file}' has {len(candidates)} {ndim}-D numeric variables {sorted(candidates)}; "
                "name the one to use with --data.cube_key / --data.mask_key"
            )
        key, chosen = candidates[0], arrays[candidates[0]]
    if np.iscomplexobj(chosen):  # a float cast would drop the imaginary part without a word
        raise DataFormatError(f"MATLAB variable '{key}' of '{file}' is complex; pass real-valued data (e.g. its magnitude)")
    return chosen


def read_mask(path: str | Path, key: str | None = None) -> np.ndarray:
    """Read a 2-D ground-truth mask from an ENVI ``.hdr`` (single band), ``.mat`` or ``.npy`` file."""
    file = _existing(path, "mask file", "--data.mask_path")
    suffix = file.suffix.lower()
    if suffix == ".hdr":
        from spectral.io import envi

        mask, _ = read_envi(file, dtype=None, refuse_ignored=False)
        if mask.shape[-1] != 1:
            raise DataFormatError(f"ENVI mask '{file}' has {mask.shape[-1]} bands; pass a single-band mask")
        mask = mask[..., 0]
        meta = envi.read_envi_header(str(file))  # read_envi parsed it already, so this cannot fail
        if "data ignore value" in meta:
            # a classification map's data ignore value marks unlabelled pixels, which are background (0) here, not
            # targets (load_scene's default: any non-zero value) nor one of target_values
            mask = np.where(mask == _ignore_value(meta["data ignore value"], file), np.zeros((), mask.dtype), mask)
        return mask
    if suffix == ".mat":
        return read_mat(file, key, ndim=2)
    if suffix == ".npy":
        try:
            return np.load(file, allow_pickle=False)
        except (ValueError, EOFError, OSError) as error:
            raise DataFormatError(f"mask file '{file}' cannot be read as a .npy array ({error}); pass a valid mask") from None
    raise DataFormatError(f"mask file '{file}' has unknown extension '{suffix}'; use an ENVI .hdr, .mat or .npy mask")


def load_scene(
    path: str | Path,
    mask_path: str | Path | None = None,
    cube_key: str | None = None,
    mask_key: str | None = None,
    target_values: Sequence[int] | None = None,
) -> HyperspectralScene:
    """Load a cube (ENVI ``.hdr`` or ``.mat``) and its mask into a :class:`HyperspectralScene`.

    The mask comes from ``mask_path``, or for a ``.mat`` cube without one, from a 2-D variable of
    the same file. Pixels whose mask value is in ``target_values`` are targets (default: any
    non-zero value), so a class map such as Indian Pines' can be turned into one-class detection.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".hdr":
        cube, wavelengths = read_envi(file)
        if mask_path is None:
            raise DataFormatError(f"ENVI cube '{file}' needs a ground-truth mask; pass --data.mask_path")
        labels = read_mask(mask_path, mask_key)
    elif suffix == ".mat":
        cube, wavelengths = read_mat(file, cube_key, ndim=3).astype(np.float32), None
        if cube.ndim != 3:  # a named 2-D variable: the mask's size check would fail deep inside the data module
            raise DataFormatError(
                f"MATLAB variable '{cube_key}' of '{file}' is {cube.ndim}-D; a cube is (rows, columns, bands): pass its "
                "name with --data.cube_key"
            )
        require_finite(cube, file)
        labels = read_mask(mask_path, mask_key) if mask_path is not None else read_mat(file, mask_key, ndim=2)
    else:
        _existing(file, "hyperspectral file", "--data.path")
        raise DataFormatError(f"hyperspectral file '{file}' has unknown extension '{suffix}'; pass an ENVI .hdr or a .mat file")
    labels = np.squeeze(np.asarray(labels))
    if np.issubdtype(labels.dtype, np.floating) and not np.isfinite(labels).all():  # NaN != 0: a target, silently
        raise DataFormatError(
            f"mask {mask_path or file} has {int((~np.isfinite(labels)).sum())} non-finite values; pass a mask of class "
            "numbers (0 for background)"
        )
    if suffix == ".mat" and labels.shape != cube.shape[:2] and labels.shape == cube.shape[1:]:
        # numpy/PyTorch order (bands, rows, columns): the mask is right, the cube's axes are not (ENVI's come from its header)
        transposed = " (or, if it is (rows, columns, bands), the mask is transposed)" if labels.shape == cube.shape[1::-1] else ""
        raise DataFormatError(
            f"cube '{file}' has shape {cube.shape} and its mask {labels.shape} matches the last two axes: the cube looks "
            f"band-first (bands, rows, columns){transposed}; save it as (rows, columns, bands), e.g. "
            "scipy.io.savemat(path, {'cube': np.moveaxis(cube, 0, -1), ...})"
        )
    if labels.shape != cube.shape[:2]:
        raise DataFormatError(
            f"mask {mask_path or file} has shape {labels.shape} but cube '{file}' is {cube.shape[0]}x{cube.shape[1]} "
            "pixels; pass the ground-truth mask of this cube"
        )
    mask = np.isin(labels, list(target_values)) if target_values is not None else labels != 0
    return HyperspectralScene(name=file.stem, cube=np.asarray(cube, dtype=np.float32), mask=mask, wavelengths=wavelengths)


def crop_scene(scene: HyperspectralScene, crop_size: int) -> list[HyperspectralScene]:
    """Cut a scene into ``crop_size`` tiles (the last row/column of tiles may be smaller)."""
    height, width = scene.mask.shape
    return [
        HyperspectralScene(
            name=f"{scene.name}[{r}:{r + crop_size},{c}:{c + crop_size}]",
            cube=scene.cube[r : r + crop_size, c : c + crop_size],
            mask=scene.mask[r : r + crop_size, c : c + crop_size],
            wavelengths=scene.wavelengths,
        )
        for r in range(0, height, crop_size)
        for c in range(0, width, crop_size)
    ]


# --------------------------------------------------------------------------- splits and datamodule


def split_scenes(
    has_target: Sequence[bool], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Split scene indices into disjoint train/val/test lists, stratified by whether a scene has targets.

    Each split gets ``round(fraction · count)`` of the scenes with targets (at least one when there
    are three or more) and of those without; the rest go to training.
    """
    rng = np.random.default_rng(seed)
    splits: tuple[list[int], list[int], list[int]] = ([], [], [])
    for flag in (True, False):
        group = [i for i, h in enumerate(has_target) if bool(h) == flag]
        group = [group[i] for i in rng.permutation(len(group))]
        minimum = 1 if flag and len(group) >= 3 else 0
        n_test = max(minimum, round(test_fraction * len(group)))
        n_val = max(minimum, round(val_fraction * len(group)))
        splits[2].extend(group[:n_test])
        splits[1].extend(group[n_test : n_test + n_val])
        splits[0].extend(group[n_test + n_val :])
    if not all(splits):
        raise DataFormatError(
            f"{len(has_target)} scenes/crops cannot fill train, val and test splits (sizes "
            f"{[len(s) for s in splits]}); use more scenes or a smaller --data.crop_size"
        )
    return tuple(sorted(s) for s in splits)  # type: ignore[return-value]


def scene_pixels(scenes: Sequence[HyperspectralScene]) -> tuple[torch.Tensor, torch.Tensor]:
    """All pixels of ``scenes`` as spectra (N, B) float32 and labels (N,) float32 (1 = target)."""
    spectra = np.concatenate([s.cube.reshape(-1, s.cube.shape[-1]) for s in scenes])
    labels = np.concatenate([s.mask.reshape(-1) for s in scenes]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(spectra, dtype=np.float32)), torch.from_numpy(labels)


class HyperspectralDataModule(SplitDataModule):
    """Per-pixel target detection data, split by scene, standardised per band from training pixels.

    With ``path=None`` (default) it generates ``num_scenes`` synthetic scenes (see
    :func:`make_synthetic_scenes`). With ``path`` it loads an ENVI ``.hdr`` or ``.mat`` cube and its
    mask (see :func:`load_scene`) and cuts it into ``crop_size`` tiles, which are the scenes that are
    split. After :meth:`setup`, ``train_pixels``/``val_pixels``/``test_pixels`` hold the raw spectra,
    ``*_labels`` the labels, ``band_mean``/``band_std`` the standardisation and ``pos_weight``
    the training ratio of background to target pixels.
    """

    def __init__(
        self,
        path: str | None = None,
        mask_path: str | None = None,
        cube_key: str | None = None,
        mask_key: str | None = None,
        target_values: list[int] | None = None,
        crop_size: int = 64,
        num_scenes: int = 24,
        scene_size: int = 64,
        num_bands: int = 64,
        noise_std: float = 0.01,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if path is not None and not Path(path).is_file():
            raise DataNotFoundError(
                f"hyperspectral file '{path}' not found; pass --data.path to an existing ENVI .hdr or .mat file, "
                "or leave it unset for synthetic scenes"
            )
        self.save_hyperparameters()
        self.path, self.mask_path, self.cube_key, self.mask_key = path, mask_path, cube_key, mask_key
        self.target_values = target_values
        check_whole("crop_size", crop_size, 1, 64, "a whole number of pixels")
        self.crop_size = crop_size
        check_whole("scene_size", scene_size, 8, 64, "a whole number of pixels")
        if isinstance(num_scenes, bool) or not isinstance(num_scenes, int) or num_scenes < 3:
            raise ConfigError(
                f"num_scenes={num_scenes!r} must be a whole number >= 3 (a scene each for train, val and test); pass "
                "e.g. --data.num_scenes 24"
            )
        check_whole("num_bands", num_bands, 1, 64)
        check_real("noise_std", noise_std, 0.0, 0.01, what=" (the synthetic sensor noise; 0: none)")
        check_split_fractions(val_fraction, test_fraction)
        check_loader_args(batch_size, num_workers, seed)
        self.num_scenes, self.scene_size, self.num_bands, self.noise_std = num_scenes, scene_size, num_bands, noise_std
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.scenes: dict[str, list[HyperspectralScene]] = {}
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self.pos_weight: float | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        loaded = None if self.path is None else load_scene(
            self.path, self.mask_path, self.cube_key, self.mask_key, self.target_values
        )
        scenes = crop_scene(loaded, self.crop_size) if loaded is not None else make_synthetic_scenes(
            self.num_scenes, seed=self.seed, size=self.scene_size, num_bands=self.num_bands, noise_std=self.noise_std
        )
        train, val, test = split_scenes([s.mask.any() for s in scenes], self.val_fraction, self.test_fraction, self.seed)
        if loaded is not None:
            self._warn_targets_across_splits(loaded.mask, (train, val, test))
        self.num_bands = scenes[0].cube.shape[-1]
        self.scenes = {"train": [scenes[i] for i in train], "val": [scenes[i] for i in val], "test": [scenes[i] for i in test]}
        self.train_pixels, self.train_labels = scene_pixels(self.scenes["train"])
        self.val_pixels, self.val_labels = scene_pixels(self.scenes["val"])
        self.test_pixels, self.test_labels = scene_pixels(self.scenes["test"])
        positives = int(self.train_labels.sum())
        if positives == 0:
            raise DataFormatError(
                "the training scenes contain no target pixels; check --data.target_values or use a smaller --data.crop_size"
            )
        for split, labels in (("validation", self.val_labels), ("test", self.test_labels)):
            if len(labels) and not bool(labels.any()):  # AP and AUROC of no positive would read as measured zeros
                raise DataFormatError(
                    f"the {split} scenes contain no target pixels, so its AP and AUROC would mean nothing; use a smaller "
                    "--data.crop_size (more crops to split), or a scene with more targets"
                )
        self.pos_weight = (len(self.train_labels) - positives) / positives
        self.band_mean = self.train_pixels.mean(0)
        self.band_std = self.train_pixels.std(0)
        # A band constant in training (a dead or saturated detector band) has no scale to divide by: like scikit-learn's
        # StandardScaler, scale 1 (a clamp to a tiny std would blow its held-out deviations up a million-fold).
        constant = self.band_std < 1e-6 * float(self.train_pixels.std().clamp_min(1e-12))
        if bool(constant.any()):
            self.band_std = torch.where(constant, torch.ones_like(self.band_std), self.band_std)
            rank_zero_warn(
                f"HyperspectralDataModule: band(s) {constant.nonzero().flatten().tolist()} (0-based) are constant in the "
                "training pixels, so they are centred but not scaled (scale 1); drop them if they are bad bands"
            )
        self.train_set = TensorDataset(self.standardise(self.train_pixels), self.train_labels)
        self.val_set = TensorDataset(self.standardise(self.val_pixels), self.val_labels)
        self.test_set = TensorDataset(self.standardise(self.test_pixels), self.test_labels)

    def _warn_targets_across_splits(self, mask: np.ndarray, splits: tuple[list[int], ...]) -> None:
        """A target object (8-connected target pixels) cut by a tile border can have pixels in a training and in a
        test tile: the model is then scored on the rest of an object it trained on. Say how many objects are cut so.
        """
        split_of = np.zeros(mask.shape, dtype=np.int64)
        origins = [(r, c) for r in range(0, mask.shape[0], self.crop_size) for c in range(0, mask.shape[1], self.crop_size)]
        for split, tiles in enumerate(splits):
            for tile in tiles:
                r, c = origins[tile]
                split_of[r : r + self.crop_size, c : c + self.crop_size] = split
        objects, count = ndimage.label(mask, structure=np.ones((3, 3)))
        object_of_pairs = np.unique(np.stack([objects[mask], split_of[mask]]), axis=1)[0]  # one per (object, split)
        shared = int((np.unique(object_of_pairs, return_counts=True)[1] > 1).sum())
        if shared:
            rank_zero_warn(
                f"HyperspectralDataModule: {shared} of {count} target objects of '{self.path}' have pixels in tiles of "
                f"two splits (cut by the {self.crop_size}-px tile borders), so validation/test score parts of objects "
                "that training saw; choose a --data.crop_size whose borders miss them (docs/spectral_nn.md)"
            )

    def standardise(self, spectra: torch.Tensor) -> torch.Tensor:
        """Per-band z-score with the training-pixel mean and standard deviation."""
        return (spectra - self.band_mean) / self.band_std

    def shuffle_seed(self) -> int:
        return self.seed
