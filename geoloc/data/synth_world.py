"""The synthetic world's pixels: a procedural texture of the whole Earth at ~100 m per pixel.

The world is a fixed function of latitude and longitude (it does not depend on any seed), so
two datasets drawn with different seeds show the same places, and two crops that overlap on the
ground share their pixels. World coordinates are equirectangular: y = lat * PX_PER_DEG,
x = lon * PX_PER_DEG, one unit = 1/1111.95 degree (100 m of latitude). A crop is axis-aligned
in that grid, centred on its point, with rows 1 unit apart and columns 1/cos(lat) units apart,
so every pixel covers ~100 m x 100 m of ground at any latitude.

The texture is value noise (a random value at each lattice node, smoothstep interpolation) in
several octaves:
- colour: 3 channels, lattice spacings 819 / 205 / 51 km: a region's palette;
- luminance: 1 channel, spacings 25.6 km down to 400 m: the pattern inside a crop. A 64 px crop
  (6.4 km) holds a few H3 r7 cells (~2.3 km across); the pattern is unique to the place and
  continuous, so neighbouring cells look alike and a model can learn where a crop is.
Lattices wrap around the antimeridian (each octave's x spacing divides the circumference).

Vectorised over a batch of crops: per octave, the noise is interpolated along x for the few
lattice rows a crop touches, then along y; only element-wise numpy arithmetic (no BLAS sums),
so a crop's bytes do not depend on the batch it was rendered in.
"""

from __future__ import annotations

import numpy as np

PX_PER_DEG = 1111.95  # world units per degree: 100 m of latitude each
PERIOD = 360.0 * PX_PER_DEG  # world units around the equator
MAX_ABS_LAT = 85.0  # crops are clamped here (columns grow as 1/cos(lat))
WORLD_VERSION = 1  # bump when the texture changes

COLOUR_SPACINGS = (8192.0, 2048.0, 512.0)
COLOUR_WEIGHTS = (1.0, 0.75, 0.45)
LUMA_SPACINGS = (256.0, 128.0, 64.0, 32.0, 16.0, 8.0, 4.0)
LUMA_WEIGHTS = (0.7, 0.85, 1.0, 0.95, 0.8, 0.6, 0.42)
COLOUR_GAIN = 2.6  # contrast stretch of the summed octaves (sums cluster around 0.5)
LUMA_GAIN = 2.2

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_F1 = np.uint64(0xFF51AFD7ED558CCD)
_F2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_MASK21 = np.uint64((1 << 21) - 1)


def _hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """uint64 hash of lattice nodes (murmur3's finaliser over a mix of the coordinates)."""
    h = (ix.astype(np.int64).view(np.uint64) * _M1) ^ (iy.astype(np.int64).view(np.uint64) * _M2)
    h ^= np.uint64(salt)
    h ^= h >> _S33
    h *= _F1
    h ^= h >> _S33
    h *= _F2
    h ^= h >> _S33
    return h


def _node_values(h: np.ndarray, channels: int) -> np.ndarray:
    """(..., channels) uniform [0, 1) values from 21-bit fields of the hash."""
    fields = [(h >> np.uint64(43 - 21 * c)) & _MASK21 for c in range(channels)]
    return np.stack(fields, axis=-1).astype(np.float32) * np.float32(1.0 / (1 << 21))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _octave(x: np.ndarray, y: np.ndarray, spacing: float, salt: int, channels: int) -> np.ndarray:
    """(B, S, S, channels) value noise at columns `x` (B, S) and rows `y` (B, S)."""
    nx = max(1, round(PERIOD / spacing))  # x spacing adjusted so the lattice wraps exactly
    u = x / (PERIOD / nx)
    v = y / spacing
    ix0 = np.floor(u)
    wx = _smooth(u - ix0).astype(np.float32)[:, None, :, None]  # (B, 1, S, 1)
    ix0 = np.mod(ix0.astype(np.int64), nx)
    ix1 = np.mod(ix0 + 1, nx)
    iy0 = np.floor(v)
    wy = _smooth(v - iy0).astype(np.float32)[:, :, None, None]  # (B, S, 1, 1)
    iy0 = iy0.astype(np.int64)
    base = iy0.min(axis=1, keepdims=True)  # (B, 1)
    rows = iy0 - base  # (B, S): lattice row of each pixel row, from 0
    n_rows = int(rows.max()) + 2
    lattice_y = (base + np.arange(n_rows))[:, :, None]  # (B, R, 1)
    left = _node_values(_hash(ix0[:, None, :], lattice_y, salt), channels)  # (B, R, S, C)
    right = _node_values(_hash(ix1[:, None, :], lattice_y, salt), channels)
    along_x = left + wx * (right - left)  # (B, R, S, C)
    if n_rows == 2:  # coarse octaves: every pixel row lies between the same two lattice rows
        top, bottom = along_x[:, :1], along_x[:, 1:]
    else:
        b = np.arange(len(x))[:, None]
        top, bottom = along_x[b, rows], along_x[b, rows + 1]  # (B, S, S, C)
    return top + wy * (bottom - top)


def _fbm(x, y, spacings, weights, salt: int, channels: int, gain: float) -> np.ndarray:
    total = sum(weights)
    acc = None
    for k, (spacing, weight) in enumerate(zip(spacings, weights, strict=True)):
        layer = _octave(x, y, spacing, salt * 1000 + k, channels) * np.float32(weight / total)
        acc = layer if acc is None else acc + layer
    return np.clip(0.5 + (acc - 0.5) * np.float32(gain), 0.0, 1.0)


def crop_coordinates(lat: np.ndarray, lon: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): world coordinates of the columns (B, S) and rows (B, S) of crops at the points."""
    lat = np.clip(np.asarray(lat, dtype=np.float64), -MAX_ABS_LAT, MAX_ABS_LAT)
    lon = np.asarray(lon, dtype=np.float64)
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    step = 1.0 / np.cos(np.radians(lat))  # columns 100 m apart on the ground
    x = lon[:, None] * PX_PER_DEG + offsets[None, :] * step[:, None]
    y = lat[:, None] * PX_PER_DEG - offsets[None, :]  # row 0 is the northern edge
    return x, y


def render(lat: np.ndarray, lon: np.ndarray, size: int = 64) -> np.ndarray:
    """(B, size, size, 3) uint8 crops of the world centred on the points."""
    x, y = crop_coordinates(lat, lon, size)
    colour = _fbm(x, y, COLOUR_SPACINGS, COLOUR_WEIGHTS, 1, 3, COLOUR_GAIN)
    luma = _fbm(x, y, LUMA_SPACINGS, LUMA_WEIGHTS, 2, 1, LUMA_GAIN)
    palette = 0.12 + 0.76 * colour  # keep colours off black and white
    pixels = palette * (0.3 + 1.4 * luma)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def coarse_value(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(N, 3) the world's colour field at the points, in [0, 1): per-place attributes."""
    x = np.asarray(lon, dtype=np.float64)[:, None] * PX_PER_DEG
    y = np.asarray(lat, dtype=np.float64)[:, None] * PX_PER_DEG
    return _fbm(x, y, COLOUR_SPACINGS, COLOUR_WEIGHTS, 1, 3, COLOUR_GAIN)[:, 0, 0, :]
