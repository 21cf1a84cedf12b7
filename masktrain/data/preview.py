"""Write a PNG grid of synthetic samples with their object masks.

    python -m masktrain.data.preview --out docs/cues_samples.png --image-size 64               # data=cues
    python -m masktrain.data.preview --variant all --split test --count 8 --out docs/cues_variants.png
    python -m masktrain.data.preview --dataset cues --variant cue_conflict --split test --out conflict.png
    python -m masktrain.data.preview --dataset silhouettes --out docs/shapes_samples.png --image-size 64
"""
from __future__ import annotations

import argparse

import torch

from masktrain.data.cues import VARIANTS, CuesDataset
from masktrain.data.shapes import ShapesDataset
from masktrain.errors import exit_on_user_error
from masktrain.viz import sample_grid, save_grid


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["cues", "silhouettes", "shapes"], default="cues")
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="clean",
                        help="cues only; all: one row per variant of the same samples (no masks)")
    parser.add_argument("--texture-reliability", type=float, default=0.0, help="silhouettes only")
    args = parser.parse_args(argv)
    if args.dataset == "cues" and args.variant == "all":
        rows = [CuesDataset(args.split, length=args.count, image_size=args.image_size, num_classes=args.num_classes,
                            seed=args.seed, variant=v) for v in VARIANTS]
        images = torch.stack([ds[i][0] for ds in rows for i in range(args.count)])
        path = save_grid(images, args.out, nrow=args.count)
        print(f"wrote {path}: {args.count} samples, one row per variant ({', '.join(VARIANTS)})")
        return
    if args.dataset == "cues":
        ds = CuesDataset(args.split, length=args.count, image_size=args.image_size, num_classes=args.num_classes,
                         seed=args.seed, variant=args.variant)
    else:
        ds = ShapesDataset(args.split, length=args.count, image_size=args.image_size, num_classes=args.num_classes,
                           seed=args.seed, texture_reliability=args.texture_reliability)
    path = sample_grid(ds, args.out, count=args.count, nrow=8)
    print(f"wrote {path}: {args.count} samples (rows of images, their object masks below)")


if __name__ == "__main__":
    main()
