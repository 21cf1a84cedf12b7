"""noisy_linear next to ROAD's own NoisyLinearImputer, and LIME under grey vs layer, side by side.

    git clone https://github.com/tleemann/road_evaluation /path/road_evaluation
    python benchmarks/attribution.py --road-path /path/road_evaluation
    python benchmarks/attribution.py --road-path ... --device cuda      # our solver on the GPU too
    python benchmarks/attribution.py --skip-road --lime-images 2        # LIME part only

Part 1 (imputation): a batch of ``--batch`` random images at ``--size``² with random-patch
(ROAD-like scattered 4x4 patches, 50%), blob (~40%) and rectangle masks (``--kinds`` adds one
big square hole, thin lines, 98% removed and isolated single-pixel holes). ROAD's imputer
(``road.imputations.NoisyLinearImputer(noise=0)``, imported from ``--road-path`` at run time,
never copied here) solves each image on the CPU with scipy's ``spsolve``; ours solves the
whole batch at once: on a CPU with the compiled solver (``solver=auto``, numba) and with the
batched torch solver, at 1 thread (ROAD's scipy solve is single-threaded) and at torch's
default thread count. ROAD is timed as its users call it: ``NoisyLinearImputer.__call__`` per
image, which includes building the sparse system. Prints seconds per image for each (best of
``--repeats``), the ratio ROAD / ours, and the max abs difference between the two (noise 0).

Part 2 (attribution): LIME with ``--lime-samples`` perturbations per image on a ``--model``
(random weights: speed only) under ``grey`` and under ``layer``, images/s and the ratio.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from masktrain.masks import make_keep_masks
from masktrain.noisy_linear import noisy_linear
from masktrain.rng import step_generator


def masks(kind: str, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Keep masks ``(n, 1, size, size)`` of one kind."""
    if kind == "patches":
        coarse = (torch.rand(n, 1, size // 4, size // 4, generator=g) > 0.5).float()
        return F.interpolate(coarse, size=(size, size), mode="nearest")
    if kind == "blob":
        low = torch.rand(n, 1, max(2, size // 8), max(2, size // 8), generator=g)
        up = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        return (up > up.flatten(1).quantile(0.4, dim=1).view(n, 1, 1, 1)).float()
    if kind == "rectangles":
        return make_keep_masks("rectangles", n, (size, size), g, count=2, area=(0.15, 0.35))
    keep = torch.ones(n, 1, size, size)
    if kind == "square":  # one big hole, 56%: the deepest interior
        keep[..., size // 8: size - size // 8, size // 8: size - size // 8] = 0
        return keep
    if kind == "lines":  # 1-px lines every 5th row and 7th column
        keep[..., ::5, :] = 0
        keep[..., :, 2::7] = 0
        return keep
    if kind == "almost_all":  # 98% removed
        keep = (torch.rand(n, 1, size, size, generator=g) > 0.98).float()
        keep[..., 0, 0] = 1
        return keep
    if kind == "tiny":  # isolated single-pixel holes, 20%
        return (torch.rand(n, 1, size, size, generator=g) > 0.2).float()
    raise ValueError(kind)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _variants(args) -> list[tuple[str, str, str, int]]:
    """(label, device, solver/preconditioner, threads) of our solver to time."""
    out = []
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" and torch.cuda.is_available() else [])
    for d in devices:
        for sv in args.solvers.split(","):
            for th in ([int(t) for t in args.our_threads.split(",")] if d == "cpu" else [0]):
                if d == "cuda" and sv == "auto":
                    continue  # the compiled solver is CPU-only; on CUDA auto is torch/multigrid
                out.append((f"{d} {sv}" + (f" {th}t" if th else ""), d, sv, th))
    return out


def _ours(x, k, tol, solver: str):
    if solver == "auto":
        return noisy_linear(x, k, noise_std=0.0, tol=tol)
    pc = solver.split("/")[1]
    return noisy_linear(x, k, noise_std=0.0, tol=tol, solver="torch", preconditioner=pc)


def imputation(args) -> None:
    sys.path.insert(0, args.road_path)
    from road.imputations import NoisyLinearImputer  # ROAD's published code, from the user's checkout

    road = NoisyLinearImputer(noise=0.0)
    variants = _variants(args)
    default_threads = torch.get_num_threads()
    print(f"# noisy linear imputation, batch {args.batch} at {args.size}², tol {args.tol}; ROAD: its own "
          f"NoisyLinearImputer.__call__ per image (system set-up + scipy spsolve, single-threaded), "
          f"best of {args.repeats}; ours: the whole batch, best of {args.repeats}, N t = N torch/numba threads")
    print(f"{'masks':<11} {'removed':>7} {'ROAD s/img':>10} " + " ".join(f"{lab + ' s/img':>24} {'ROAD/ours':>9} {'max|err|':>9}" for lab, *_ in variants))
    for kind in args.kinds.split(","):
        g = step_generator(args.seed, 0, 0)
        images = torch.rand(args.batch, 3, args.size, args.size, generator=g)
        keep = masks(kind, args.batch, args.size, g)
        n_road = min(args.road_images, args.batch)
        road_s = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            ref = torch.stack([road(images[i].clone(), keep[i, 0].clone()) for i in range(n_road)])
            road_s = min(road_s, (time.perf_counter() - start) / n_road)
        row = f"{kind:<11} {1 - keep.mean().item():>7.2f} {road_s:>10.4f} "
        for _, d, sv, th in variants:
            torch.set_num_threads(th or default_threads)
            x, k = images.to(d), keep.to(d)
            _ours(x[:2], k[:2], args.tol, sv)  # warm-up: CUDA context, numba's compiled-code cache
            ours_s = float("inf")
            for _ in range(args.repeats):
                _sync(d)
                start = time.perf_counter()
                out = _ours(x, k, args.tol, sv)
                _sync(d)
                ours_s = min(ours_s, (time.perf_counter() - start) / args.batch)
            e = (out[:n_road].cpu() - ref).abs().max().item()
            row += f"{ours_s:>24.5f} {road_s / ours_s:>9.1f} {e:>9.2e} "
        torch.set_num_threads(default_threads)
        print(row, flush=True)


def lime_speed(args) -> None:
    from masktrain.attribution import AttributionConfig, attribute
    from masktrain.models import create_model

    device = args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu"
    model = create_model(args.model, 10).eval().to(device)
    g = step_generator(args.seed, 0, 1)
    images = torch.rand(args.lime_images, 3, args.lime_size, args.lime_size, generator=g).to(device)
    targets = torch.zeros(args.lime_images, dtype=torch.long, device=device)
    cfg = AttributionConfig(features="grid", patch=args.lime_size // 8, n_samples=args.lime_samples,
                            perturbations_per_eval=args.perturbations_per_eval)
    print(f"# LIME, {args.lime_samples} samples/image, {args.model} at {args.lime_size}², "
          f"{args.perturbations_per_eval} perturbations per forward, {device}")
    rates = {}
    for method in ("grey", "layer"):
        attribute(model, images[:1], targets[:1], "lime", method, config=AttributionConfig(
            features="grid", patch=args.lime_size // 8, n_samples=args.perturbations_per_eval,
            perturbations_per_eval=args.perturbations_per_eval))  # warm-up (layer: conversion)
        _sync(device)
        start = time.perf_counter()
        attribute(model, images, targets, "lime", method, config=cfg)
        _sync(device)
        rates[method] = args.lime_images / (time.perf_counter() - start)
        print(f"{method:<6} {rates[method]:8.3f} images/s", flush=True)
    print(f"layer / grey time: {rates['grey'] / rates['layer']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--road-path", help="checkout of github.com/tleemann/road_evaluation (the folder holding road/)")
    p.add_argument("--skip-road", action="store_true")
    p.add_argument("--skip-lime", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--kinds", default="patches,blob,rectangles",
                   help="mask kinds: patches, blob, rectangles (the issue's), square, lines, almost_all, tiny")
    p.add_argument("--road-images", type=int, default=16, help="images ROAD solves (its time is per image)")
    p.add_argument("--tol", type=float, default=2e-6)
    p.add_argument("--solvers", default="auto,torch/multigrid",
                   help="noisy_linear solvers to time side by side: auto (compiled on CPU), torch/multigrid, torch/jacobi")
    p.add_argument("--our-threads", default="1,0", help="thread counts for our CPU solver (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings, for ROAD and for ours")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--lime-images", type=int, default=2)
    p.add_argument("--lime-size", type=int, default=224)
    p.add_argument("--lime-samples", type=int, default=500)
    p.add_argument("--perturbations-per-eval", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_road:
        if not args.road_path:
            p.error("--road-path is required for the imputation comparison (or pass --skip-road)")
        imputation(args)
    if not args.skip_lime:
        lime_speed(args)


if __name__ == "__main__":
    main()
