"""Write a PNG grid of synthetic samples with their object masks.

    python -m masktrain.data.preview --out docs/shapes_samples.png --image-size 64
"""
from __future__ import annotations

import argparse

from masktrain.data.shapes import ShapesDataset
from masktrain.errors import exit_on_user_error
from masktrain.viz import sample_grid


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="shapes_samples.png")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texture-reliability", type=float, default=0.0)
    args = parser.parse_args(argv)
    ds = ShapesDataset(args.split, length=args.count, image_size=args.image_size, num_classes=args.num_classes,
                       seed=args.seed, texture_reliability=args.texture_reliability)
    path = sample_grid(ds, args.out, count=args.count, nrow=8)
    print(f"wrote {path}: {args.count} samples (rows of images, their object masks below)")


if __name__ == "__main__":
    main()
