#!/usr/bin/env python3
"""Re-encode every JPEG of a JPEG-bytes ``.npz`` dataset once more at a given quality.

Used by the JPEG-sensitivity cells of docs/reproducing_emp_ssl.md: our CIFAR-10 copy was saved once as
JPEG (quality 75, 4:2:0); encoding it a second time and measuring what the second encoding costs bounds
what the first one may have cost. Input and output hold the arrays of ``onepoch prepare npz``'s JPEG form
(``train_jpeg, train_offsets, y_train, test_jpeg, test_offsets, y_test[, class_names]``); each image is
decoded with Pillow and saved with ``quality=Q`` and 4:2:0 chroma subsampling (``--subsampling 0`` for
4:4:4). Prints the mean absolute change per value (0..255) of the decoded pixels.

    python scripts/reencode_jpeg_npz.py cifar10-jpeg.npz --quality 75 --out cifar10-jpeg-q75.npz
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def reencode_split(blob: np.ndarray, offsets: np.ndarray, quality: int, subsampling: int):
    """(new bytes, new offsets, mean |decoded_new - decoded_old|) of one split's concatenated JPEGs."""
    parts, new_offsets, diff_sum, values = [], [0], 0.0, 0
    for i in range(len(offsets) - 1):
        with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())) as img:
            old = np.asarray(img.convert("RGB"))
        buf = io.BytesIO()
        Image.fromarray(old).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as img:
            new = np.asarray(img.convert("RGB"))
        diff_sum += float(np.abs(new.astype(np.int16) - old).sum())
        values += old.size
        parts.append(np.frombuffer(data, np.uint8))
        new_offsets.append(new_offsets[-1] + len(data))
    return np.concatenate(parts), np.asarray(new_offsets, np.int64), diff_sum / max(values, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a JPEG-bytes .npz (train_jpeg, train_offsets, ...)")
    parser.add_argument("--quality", type=int, required=True, help="JPEG quality of the second encoding (1-100)")
    parser.add_argument("--subsampling", type=int, default=2, choices=(0, 1, 2),
                        help="Pillow's chroma subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0 (default, as the copy)")
    parser.add_argument("--out", required=True, help=".npz to write (refused if it exists)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"reencode: error: {out} exists; choose another --out", file=sys.stderr)
        return 2
    if not 1 <= args.quality <= 100:
        print(f"reencode: error: --quality must be 1-100, got {args.quality}", file=sys.stderr)
        return 2
    with np.load(args.source) as src:
        arrays = {key: src[key] for key in src.files}
    for split in ("train", "test"):
        if f"{split}_jpeg" not in arrays:
            print(f"reencode: error: {args.source} has no {split}_jpeg array", file=sys.stderr)
            return 2
        blob, offsets, diff = reencode_split(arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"],
                                             args.quality, args.subsampling)
        arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"] = blob, offsets
        print(f"{split}: {len(offsets) - 1:,} images re-encoded at quality {args.quality}; "
              f"mean change {diff:.2f}/255 per value")
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
