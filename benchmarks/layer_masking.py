"""Layer-masked vs plain models, measured side by side in one run (a benchmark, not a test).

    python benchmarks/layer_masking.py                      # CUDA if present, else CPU, 2 threads
    python benchmarks/layer_masking.py --threads 2 --repeats 5 --batch 8 --size 224
    python benchmarks/layer_masking.py --archs resnet50 --backward resnet50
    python benchmarks/layer_masking.py --device cuda --arch resnet50 --batch 64 --precision fp32 bf16   # GPU, both precisions
    python benchmarks/layer_masking.py --paper-path /path/layer_masking   # also the paper's own forks (benchmarks/paper_forks.py)

For each of ``--archs`` (default ResNet-50, EfficientNet-B0, DenseNet-121, ConvNeXt-T) it
times the forward pass (eval, no_grad) of ``layer_mask(model)`` and of the plain model on
the same batch (random 16×16 patches, about half removed); for the archs in ``--backward``
(default ResNet-50) also forward+backward (train mode, masked BN statistics). Each repeat
runs one plain and one masked call back to back (order alternating), and the reported ratio
is the median of the per-pair ratios, so machine noise hits both alike. Also checks that the
masked logits with an all-ones mask equal the plain logits. ``--precision bf16`` runs both
models under ``torch.autocast(dtype=bfloat16)`` (the all-ones check then reports the relative
error, as bf16 rounds differently along the two graphs).

On a CPU shared with other busy processes, ``--threads 2`` on 2 cores is dominated by
scheduling: every op's parallel region waits for a descheduled thread, which penalises
the masked model's extra (short) ops far more than the plain model's long convolutions
(plain forward seen at 0.5–4.3 s on the same machine). ``--threads 1`` gives stable
ratios there; compare against a baseline only within one run or back-to-back runs.
``--clock process`` times each call in CPU time of this process (with ``--threads 1``),
which leaves out the time other processes hold the core.

``--paper-path`` (a checkout of SriramB-98/layer_masking) adds, for ResNet-50, EfficientNet-B0
and DenseNet-121, the paper's own fork beside masktrain on the torchvision twin of each model,
same batch and mask, interleaved (:mod:`paper_forks`).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch

from masktrain.layer_masking import layer_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_forks  # noqa: E402  (a sibling benchmark module, not part of the package)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock process: time.process_time (CPU time of this process)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = CLOCK()
    fn()
    _sync(device)
    return CLOCK() - start


def _pairs(plain: Callable[[], None], masked: Callable[[], None], repeats: int, device: torch.device) -> Tuple[List[float], List[float]]:
    """Interleaved timings ``(plain_s, masked_s)``, one warm-up pair first; order alternates per repeat."""
    plain(), masked()
    p_times, m_times = [], []
    for i in range(repeats):
        if i % 2 == 0:
            p_times.append(_timed(plain, device))
            m_times.append(_timed(masked, device))
        else:
            m_times.append(_timed(masked, device))
            p_times.append(_timed(plain, device))
    return p_times, m_times


def _patch_keep(batch: int, size: int, patch: int, generator: torch.Generator) -> torch.Tensor:
    """Random patch mask ``(B, 1, size, size)``: about half of the ``patch``² cells removed."""
    cells = (torch.rand(batch, 1, size // patch, size // patch, generator=generator) > 0.5).float()
    return cells.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def _report(label: str, p_times: List[float], m_times: List[float]) -> float:
    ratios = [m / p for p, m in zip(p_times, m_times)]
    ratio = statistics.median(ratios)
    print(f"{label:<22} plain {statistics.median(p_times) * 1e3:8.1f} ms   masked {statistics.median(m_times) * 1e3:8.1f} ms"
          f"   ratio (median of pairs) {ratio:.3f}x")
    return ratio


# goals from issue 14: (forward, forward+backward); None = no goal set
GOALS: Dict[str, Tuple[Optional[float], Optional[float]]] = {
    "resnet50": (1.25, 1.15),
    "efficientnet_b0": (1.4, None),
    "densenet121": (1.3, None),
    "convnext_tiny": (1.3, None),
}


def _goal(label: str, ratio: float, goal: Optional[float]) -> str:
    return "" if goal is None else f"   goal <= {goal}x: {'met' if ratio <= goal else 'NOT met'}"


def pick_device(name: str) -> torch.device:
    """``auto`` = CUDA when present, else CPU; ``cuda`` without a GPU exits with a message."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {name}: no CUDA device is available to torch {torch.__version__}")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` to bfloat16 for ``bf16``; nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def bench_arch(arch: str, args: argparse.Namespace, device: torch.device, backward: bool, precision: str) -> Dict[str, float]:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=1000).to(device)
    masked = layer_mask(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    keep = _patch_keep(args.batch, args.size, 16, g).to(device)
    goal_fwd, goal_both = GOALS.get(arch, (None, None))
    print(f"--- {arch} {precision}")
    model.eval()
    result: Dict[str, float] = {}
    with torch.no_grad(), autocast(device, precision):
        plain_logits = model(x).float()
        ones = masked(x, torch.ones_like(keep)).float()
        rel = ((ones - plain_logits).norm() / plain_logits.norm()).item()
        print(f"all-ones mask: logits identical: {torch.equal(ones, plain_logits)} (rel err {rel:.2e})")
        result["forward"] = _report(f"forward (eval) {precision}", *_pairs(lambda: model(x), lambda: masked(x, keep), args.repeats, device))
        print(_goal("forward", result["forward"], goal_fwd).strip())
    if backward:
        model.train()

        def plain_step() -> None:
            with autocast(device, precision):
                loss = model(x).float().square().mean()
            loss.backward()

        def masked_step() -> None:
            with autocast(device, precision):
                loss = masked(x, keep).float().square().mean()
            loss.backward()

        result["forward+backward"] = _report(f"forward+backward {precision}", *_pairs(plain_step, masked_step, args.repeats, device))
        print(_goal("forward+backward", result["forward+backward"], goal_both).strip())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved pairs per measurement")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--archs", nargs="+", default=list(GOALS), help="timm model names")
    parser.add_argument("--arch", dest="archs", nargs=1, help="one timm model name (same as --archs NAME)")
    parser.add_argument("--backward", nargs="*", default=["resnet50"], help="archs also timed forward+backward")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="one or more of fp32, bf16 (bf16 = torch.autocast to bfloat16)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="wall (default) or process: CPU time of this process, which leaves out the time "
                             "the scheduler gives other processes on a shared machine (meaningful with --threads 1; "
                             "with more threads it also counts OpenMP spin-waiting)")
    parser.add_argument("--paper-path", type=Path, default=None,
                        help="a checkout of SriramB-98/layer_masking: also time the paper's forks (fp32, eval)")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "process":
        CLOCK = time.process_time

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"batch {args.batch}, {args.size}², device {device}"
          f"{'' if device.type == 'cuda' else f', {args.threads} threads'}, {args.repeats} pairs, random 16x16 patches, "
          f"{args.clock} clock")
    if args.paper_path is not None:
        paper_forks.check_paper_path(args.paper_path)  # a wrong path fails before minutes of timing
    results = {(arch, p): bench_arch(arch, args, device, arch in args.backward, p) for arch in args.archs for p in args.precision}
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device),
             _patch_keep(args.batch, args.size, 16, g).to(device))
    paper = paper_forks.compare_all(args.archs, args.paper_path, batch, args.repeats, lambda fn: _timed(fn, device))
    print("summary (masked / plain, median of pairs):")
    for (arch, p), r in results.items():
        print(f"  {arch:<18} {p:<5} " + "   ".join(f"{k} {v:.3f}x" for k, v in r.items()))
    for arch, r in paper.items():
        print(f"  {arch:<18} torchvision: masktrain {r['masktrain']:.3f}x   paper's fork {r['paper']:.3f}x   "
              f"paper / masktrain {r['paper_over_masktrain']:.2f}x   logits rel. difference {r['rel_err']:.1e}")


if __name__ == "__main__":
    main()
