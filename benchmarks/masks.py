"""Mask + fill throughput next to torchvision and timm random erasing, measured side by side.

    python benchmarks/masks.py                 # 1 thread, 64² and 224²
    python benchmarks/masks.py --threads 2 --repeats 30
    python benchmarks/masks.py --device cuda --sizes 224 --batch 64 --share-arch resnet50 \
        --share-size 224 --share-batch 64 --precision fp32 bf16      # GPU: the training step at full size
    python benchmarks/masks.py --conditions-only   # foreground/background conditions at 224², batch 128

Prints img/s for each masktrain generator (with the grey fill, in place as on the
training path, where rectangles stay boxes and only the erased pixels are written;
also with the dense keep mask built first), for torchvision.transforms.v2.RandomErasing
applied per sample (returning new images that are stacked, and in place) and for timm's
RandomErasing on a batch (in place, as timm applies it, and on a copy); then the ratios
of masktrain rectangles + grey to them, and the share of a training step (default resnet18,
64², batch 64; ``--share-*``) spent on augmentation, per ``--precision`` (bf16 = the model
under ``torch.autocast``; the fill stays in fp32 pixel space). The goals are checked like for like: in place
against in place. Timings are medians of interleaved
repeats so that machine noise hits every contender alike.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing as TimmRandomErasing
from torchvision.transforms import v2

from masktrain.conditions import CONDITIONS, apply_condition
from masktrain.fills import fill
from masktrain.methods import get_method
from masktrain.masks import RandomKeepMask
from masktrain.rng import step_generator

GREY = (0.485, 0.456, 0.406)


DEVICE = torch.device("cpu")  # set by main(); CUDA work is asynchronous, so timings synchronise


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _time(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call, contenders run round-robin so drift affects all alike."""
    for fn in contenders.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(_time(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def throughput(size: int, batch: int, repeats: int) -> dict[str, float]:
    images = torch.rand(batch, 3, size, size, device=DEVICE)
    objects = (torch.rand(batch, 1, size, size, device=DEVICE) > 0.5).float()
    params = {
        "rectangles": dict(count=1, area=(0.02, 0.33), aspect=(0.3, 3.3)),
        "patches": dict(patch_size=max(4, size // 8), fraction=(0.0, 0.5)),
        "blobs": dict(area=(0.1, 0.4)),
        "silhouettes": {},
    }
    contenders: dict[str, Callable[[], object]] = {}
    for kind, kw in params.items():
        sampler = RandomKeepMask(kind, p=1.0, **kw)

        def run(sampler=sampler, inplace=True, lazy=True):
            # lazy=True is what the training step does: rectangles stay boxes for a one-colour fill
            g = step_generator(0, 0, 0, DEVICE)
            keep = sampler(batch, (size, size), g, DEVICE, object_masks=objects, lazy=lazy)
            return fill(images, keep, "grey", g, GREY, inplace=inplace)

        contenders[f"masktrain {kind} + grey"] = run
        if kind == "rectangles":
            contenders["masktrain rectangles + grey (new batch)"] = lambda run=run: run(inplace=False)
            contenders["masktrain rectangles + grey (dense keep mask)"] = lambda run=run: run(lazy=False)
    # Same job for the references: one rectangle per image (area 0.02-0.33), grey value.
    tv = v2.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=list(GREY))
    contenders["torchvision v2 RandomErasing (per sample)"] = lambda: torch.stack([tv(img) for img in images])
    tv_inplace = v2.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=list(GREY), inplace=True)
    contenders["torchvision v2 RandomErasing (per sample, in place)"] = lambda: [tv_inplace(img) for img in images]
    timm_re = TimmRandomErasing(probability=1.0, min_area=0.02, max_area=0.33, mode="const", device=str(DEVICE))
    # timm's const mode erases to 0 in normalised space = the mean colour in pixel space.
    contenders["timm RandomErasing (batch)"] = lambda: timm_re(images)
    contenders["timm RandomErasing (batch, new batch)"] = lambda: timm_re(images.clone())
    seconds = _interleaved(contenders, repeats)
    return {name: batch / s for name, s in seconds.items()}


def _autocast(precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16)


def augmentation_share(repeats: int, arch: str = "resnet18", size: int = 64, batch: int = 64,
                       precision: str = "fp32") -> tuple[float, float, float]:
    """(augment s, train step s, share) for ``arch`` at ``size``², ``batch``, rectangles + grey."""
    model = timm.create_model(arch, num_classes=10).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(batch, 3, size, size, device=DEVICE)
    labels = torch.randint(0, 10, (batch,), device=DEVICE)
    sampler = RandomKeepMask("rectangles", p=0.5, count=(1, 3), area=(0.05, 0.25))

    def augment():
        g = step_generator(0, 0, 0, DEVICE)
        return fill(images, sampler(batch, (size, size), g, DEVICE, lazy=True), "grey", g, GREY, inplace=True)

    def step():
        with _autocast(precision):
            loss = F.cross_entropy(model(images).float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    seconds = _interleaved({"augment": augment, "step": step}, repeats)
    return seconds["augment"], seconds["step"], seconds["augment"] / (seconds["augment"] + seconds["step"])


def condition_throughput(size: int, batch: int, repeats: int, methods=("black", "tile", "layer")) -> dict[str, float]:
    """img/s of every foreground/background condition (masktrain.conditions) per method: the
    condition and the method's pixel-space rendering (for layer: the masked pixels and keep mask the
    layer-masked model receives), partners drawn within the batch. Objects: one ellipse per image
    (about 20% of the image) at a random place, so boxes and strips vary per sample."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g)
    labels = torch.randint(0, 9, (batch,), generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = torch.rand(batch, 2, generator=g) - 0.5
    objects = ((((yy - centre[:, :1, None]) / 0.4) ** 2 + ((xx - centre[:, 1:, None]) / 0.6) ** 2) < 1).float()[:, None]
    contenders: dict[str, Callable[[], object]] = {}
    for method_name in methods:
        method = get_method(method_name)
        for name in CONDITIONS:
            def run(name=name, method=method):
                c = apply_condition(name, images, labels, objects, method, seed=0, num_classes=9)
                return method.render(c.images, c.keep)

            contenders[f"{name} / {method_name}"] = run
    seconds = _interleaved(contenders, repeats)
    return {name: batch / s for name, s in seconds.items()}


def _ellipse_objects(batch: int, size: int, g: torch.Generator) -> torch.Tensor:
    """One ellipse per image (about 20% of it) at a random place: ``(B, 1, size, size)``."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = torch.rand(batch, 2, generator=g) - 0.5
    return ((((yy - centre[:, :1, None]) / 0.4) ** 2 + ((xx - centre[:, 1:, None]) / 0.6) ** 2) < 1).float()[:, None]


def condition_training_share(repeats: int, arch: str = "resnet18", size: int = 64, batch: int = 64,
                             cases=(("no_fg", "grey"), ("only_bg_t", "grey"), ("mixed_rand", "tile"),
                                    ("mixed_same", "grey"), ("mixed_rand", "layer"))) -> dict[str, tuple[float, float]]:
    """``{condition / method: (input s, share of input + train step)}``: what ``mask=condition`` adds to a
    training step -- ConditionSampler.inputs (partners from the batch, the condition) and, for a fill, the
    fill -- against the plain fp32 step of ``arch`` at ``size``², ``batch``, measured interleaved."""
    from masktrain.conditions import ConditionSampler
    from masktrain.methods import FillMethod

    model = timm.create_model(arch, num_classes=10).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g0 = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g0).to(DEVICE)
    labels = torch.randint(0, 10, (batch,), generator=g0).to(DEVICE)
    objects = _ellipse_objects(batch, size, g0).to(DEVICE)
    contenders: dict[str, Callable[[], object]] = {}
    for condition, method_name in cases:
        sampler, method = ConditionSampler(1.0, condition), get_method(method_name)

        def augment(sampler=sampler, method=method):
            g = step_generator(0, 0, 0, DEVICE)
            c = sampler.inputs(images, labels, objects, g, method, 10)
            return method.apply(c.images, c.keep, g) if isinstance(method, FillMethod) else c

        contenders[f"{condition} / {method_name}"] = augment

    def step():
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    contenders["step"] = step
    seconds = _interleaved(contenders, repeats)
    return {k: (v, v / (v + seconds["step"])) for k, v in seconds.items() if k != "step"} | {"step": (seconds["step"], 1.0)}


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="image sizes for the throughput table")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="training-step precision(s) for the augmentation share")
    parser.add_argument("--share-arch", default="resnet18")
    parser.add_argument("--share-size", type=int, default=64)
    parser.add_argument("--share-batch", type=int, default=64)
    parser.add_argument("--conditions-only", action="store_true", help="only the foreground/background conditions at 224²")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: no CUDA device is available to torch {torch.__version__}")
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {DEVICE}, {args.threads} thread(s), batch {args.batch}, "
          f"median of {args.repeats} interleaved repeats")
    rates = condition_throughput(224, args.batch, max(3, args.repeats // 4))
    print(f"\nconditions (masktrain.conditions), 224x224, batch {args.batch}  img/s")
    for name, rate in rates.items():
        print(f"  {name:52s} {rate:10.0f}")
    shares = condition_training_share(max(5, args.repeats // 4), args.share_arch, args.share_size, args.share_batch)
    step_s = shares.pop("step")[0]
    print(f"\nmask=condition in a training step ({args.share_arch} {args.share_size}x{args.share_size} batch "
          f"{args.share_batch} fp32, step {step_s * 1e3:.1f} ms): input ms, share of input + step")
    for name, (seconds, share) in shares.items():
        print(f"  {name:52s} {seconds * 1e3:8.2f} ms {100 * share:6.2f}%")
    if args.conditions_only:
        return
    for size in args.sizes:
        rates = throughput(size, args.batch, args.repeats)
        print(f"\n{size}x{size}  img/s")
        for name, rate in rates.items():
            print(f"  {name:52s} {rate:10.0f}")
        ours, ours_new = rates["masktrain rectangles + grey"], rates["masktrain rectangles + grey (new batch)"]
        tv_rate = rates["torchvision v2 RandomErasing (per sample)"]
        print(f"  ratio vs timm, both in place:             {ours / rates['timm RandomErasing (batch)']:.2f}x  (goal at 224: >= 1.5x)")
        print(f"  ratio vs timm, both returning a new batch: {ours_new / rates['timm RandomErasing (batch, new batch)']:.2f}x")
        tv_inplace_rate = rates["torchvision v2 RandomErasing (per sample, in place)"]
        print(f"  ratio vs torchvision (per sample):        {ours / tv_rate:.2f}x in place, {ours_new / tv_rate:.2f}x new batch")
        print(f"  ratio vs torchvision, both in place:      {ours / tv_inplace_rate:.2f}x  (goal at 224: >= 2.5x)")
    for precision in args.precision:
        aug, step, share = augmentation_share(max(5, args.repeats // 2), args.share_arch, args.share_size,
                                              args.share_batch, precision)
        print(f"\ntraining step {args.share_arch} {args.share_size}x{args.share_size} batch {args.share_batch} {precision}: "
              f"augmentation {aug * 1e3:.2f} ms, step {step * 1e3:.1f} ms, share {100 * share:.2f}% (goal <= 3%)")


if __name__ == "__main__":
    main()
