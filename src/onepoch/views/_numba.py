"""The numba kernels behind :mod:`onepoch.views.kernels` (imported only when numba is installed; see
that module for the formulas), and the bits of a view's ``mode`` they read. Module-level functions, so
that numba's on-disk cache finds them again in the next process."""

from __future__ import annotations

import numba
import numpy as np

GRAYSCALE, FINISH, SOLARIZE, BLUR = 1, 2, 4, 8  # bits of a view's ``mode``

f32 = np.float32
wr, wg, wb = f32(0.299), f32(0.587), f32(0.114)  # onepoch.views.ops.GRAY_WEIGHTS
zero, one = f32(0.0), f32(1.0)


# Only the sum may be reassociated (so that it vectorises); every per-pixel op is IEEE-exact.
@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc"})
def gray_mean(r, g, b, gain):
    """mean over the pixels of gray(clamp(gain * (r, g, b))), summed in float64."""
    total = 0.0
    for p in range(r.shape[0]):
        total += (wr * min(max(f32(r[p]) * gain, zero), one) + wg * min(max(f32(g[p]) * gain, zero), one)
                  + wb * min(max(f32(b[p]) * gain, zero), one))
    return f32(total / r.shape[0])


@numba.njit(nogil=True, cache=True, boundscheck=False)
def jitter(r, g, b, ro, go, bo, gain, contrast, shift, saturation, hue6, do_hue):
    """brightness, contrast, saturation, hue from (r, g, b) into (ro, go, bo)."""
    s1 = one - saturation
    for p in range(r.shape[0]):
        rv = min(max(min(max(f32(r[p]) * gain, zero), one) * contrast + shift, zero), one)
        gv = min(max(min(max(f32(g[p]) * gain, zero), one) * contrast + shift, zero), one)
        bv = min(max(min(max(f32(b[p]) * gain, zero), one) * contrast + shift, zero), one)
        gray = (wr * rv + wg * gv + wb * bv) * s1
        rv = min(max(rv * saturation + gray, zero), one)
        gv = min(max(gv * saturation + gray, zero), one)
        bv = min(max(bv * saturation + gray, zero), one)
        if do_hue:
            vmax = max(max(rv, gv), bv)
            vmin = min(min(rv, gv), bv)
            chroma = vmax - vmin
            # 6 H chroma by sector: red is the max (g - b) | green (b - r) + 2C | blue (r - g) + 4C
            h6 = (gv - bv) if rv == vmax else ((bv - rv) + f32(2.0) * chroma if gv == vmax
                                               else (rv - gv) + f32(4.0) * chroma)
            h6 = h6 / max(chroma, f32(1e-12)) + hue6
            h6 = h6 - f32(6.0) * np.floor(h6 * f32(1.0 / 6.0))  # into [0, 6)
            rv = vmin + chroma * min(max(abs(abs(h6) - f32(3.0)) - one, zero), one)
            gv = vmin + chroma * min(max(abs(abs(h6 - f32(2.0)) - f32(3.0)) - one, zero), one)
            bv = vmin + chroma * min(max(abs(abs(h6 - f32(4.0)) - f32(3.0)) - one, zero), one)
        ro[p] = rv
        go[p] = gv
        bo[p] = bv


@numba.njit(nogil=True, cache=True, boundscheck=False)
def to_gray(r, g, b):
    """r = g = b = gray(r, g, b), in place."""
    for p in range(r.shape[0]):
        v = wr * r[p] + wg * g[p] + wb * b[p]
        r[p] = v
        g[p] = v
        b[p] = v


@numba.njit(nogil=True, cache=True, boundscheck=False)
def finish(x, solarize, threshold, mean, inv_std):
    """x <- (solarize(x) - mean) * inv_std in place, solarize: 1 - x where x >= threshold."""
    for p in range(x.shape[0]):
        v = x[p]
        if solarize and v >= threshold:
            v = one - v
        x[p] = (v - mean) * inv_std


@numba.njit(nogil=True, cache=True, boundscheck=False)
def blur_plane(x, tmp, pad, side, taps):
    """Gaussian blur of one ``side x side`` plane ``x`` (1-D, in place; ``tmp`` the same size, ``pad``
    ``side + 2r``): along the width, then the height, ``y[k] = sum_j taps[j] x[reflect(k + j - r)]``,
    reflecting at the borders without repeating the edge (``r = len(taps) // 2 < side``), the taps summed
    in order from the first. Every inner loop is a contiguous multiply-add, which numba vectorises."""
    radius = taps.shape[0] // 2
    for row in range(side):  # along the width, into tmp, through a reflect-padded copy of the row
        src = x[row * side:(row + 1) * side]
        for c in range(side):
            pad[radius + c] = src[c]
        for t in range(radius):
            pad[radius - 1 - t] = src[t + 1]
            pad[radius + side + t] = src[side - 2 - t]
        dst = tmp[row * side:(row + 1) * side]
        _taps_into(dst, pad, side, taps)
    for row in range(side):  # along the height, back into x: whole rows, reflected at the borders
        dst = x[row * side:(row + 1) * side]
        for j in range(taps.shape[0]):
            r = row + j - radius
            r = -r if r < 0 else (2 * (side - 1) - r if r >= side else r)
            src = tmp[r * side:(r + 1) * side]
            k = taps[j]
            if j == 0:
                for c in range(side):
                    dst[c] = src[c] * k
            else:
                for c in range(side):
                    dst[c] += src[c] * k


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _taps_into(dst, src, n, taps):
    """dst[c] = sum_j taps[j] src[c + j], c < n (the taps summed in order from the first)."""
    k = taps[0]
    for c in range(n):
        dst[c] = src[c] * k
    for j in range(1, taps.shape[0]):
        k = taps[j]
        shifted = src[j:j + n]
        for c in range(n):
            dst[c] += shifted[c] * k


@numba.njit(nogil=True, cache=True, boundscheck=False)
def render(src, src_at, out, out_at, side, gain, contrast, saturation, hue, mode, taps, threshold, do_contrast,
           do_saturation, do_hue, mean, inv_std):
    """The views of ``src`` through the colour ops into ``out``: view ``i`` is the 3 planes of ``side`` x
    ``side`` values from ``src[src_at[i]]`` (1-D, uint8 or float32), written from ``out[out_at[i]]`` (1-D float32);
    see :func:`onepoch.views.kernels.render_colour` for the rest. (Planes cut from 1-D C-contiguous arrays
    are C-contiguous, which numba needs to vectorise.)"""
    pixels = side * side
    tmp = np.empty(pixels, np.float32)
    pad = np.empty(side + taps.shape[1], np.float32)
    for i in range(src_at.shape[0]):
        a, o = src_at[i], out_at[i]
        r, g, b = src[a:a + pixels], src[a + pixels:a + 2 * pixels], src[a + 2 * pixels:a + 3 * pixels]
        ro, go, bo = out[o:o + pixels], out[o + pixels:o + 2 * pixels], out[o + 2 * pixels:o + 3 * pixels]
        c = contrast[i] if do_contrast else one
        shift = (one - c) * gray_mean(r, g, b, gain[i]) if do_contrast else zero
        jitter(r, g, b, ro, go, bo, gain[i], c, shift, saturation[i] if do_saturation else one, f32(6.0) * hue[i],
               do_hue and hue[i] != 0)
        if mode[i] & GRAYSCALE:
            to_gray(ro, go, bo)
        if mode[i] & BLUR:
            blur_plane(ro, tmp, pad, side, taps[i])
            blur_plane(go, tmp, pad, side, taps[i])
            blur_plane(bo, tmp, pad, side, taps[i])
        if mode[i] & FINISH:
            solarize = (mode[i] & SOLARIZE) != 0
            finish(ro, solarize, threshold, mean[0], inv_std[0])
            finish(go, solarize, threshold, mean[1], inv_std[1])
            finish(bo, solarize, threshold, mean[2], inv_std[2])
