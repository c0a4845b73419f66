"""Write a folder of generated JPEG "photos" of mixed sizes, to try `onepoch prepare folder` and the
README's quick start on a machine without a dataset (and to time it).

    python scripts/make_photo_folder.py photos --images 2000               # unlabelled: a few nested folders
    python scripts/make_photo_folder.py photos --images 2000 --classes 4   # labelled: one subfolder per class

Each image is a smooth random colour field with a bright square at a place that depends on its class (or
on the image, unlabelled), 48 to 160 pixels a side, landscape, portrait or square, JPEG quality 90.
Seeded: the same arguments write the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def photo(rng: np.random.Generator, label: int, classes: int) -> Image.Image:
    width, height = (int(v) for v in rng.integers(48, 161, 2))
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)).copy()
    side = min(width, height) // 3
    cells = max(2, int(np.ceil(np.sqrt(classes))))
    row, col = divmod(label % (cells * cells), cells)
    top, left = row * (height - side) // (cells - 1), col * (width - side) // (cells - 1)
    img[top:top + side, left:left + side] = 235
    return Image.fromarray(img)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (must not exist)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=0, help="0: unlabelled, in nested folders (default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(args.seed)
    for i in range(args.images):
        label = int(rng.integers(0, max(1, args.classes)))
        folder = args.out / (f"class{label}" if args.classes else f"album{i % 5}/day{i % 3}")
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng, label if args.classes else i, max(args.classes, 4)).save(folder / f"img{i:05d}.jpg", quality=90)
    print(f"wrote {args.images} JPEGs to {args.out}")


if __name__ == "__main__":
    main()
