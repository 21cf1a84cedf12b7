"""The paper's own layer-masking forks (SriramB-98/layer_masking), timed beside masktrain.

    git clone https://github.com/SriramB-98/layer_masking /path/layer_masking
    python benchmarks/layer_masking.py --paper-path /path/layer_masking

The paper ships one hand-written fork per torchvision architecture (``sal_resnet.py``,
``efficientnet.py``, ``densenet.py``; their layers in ``sal_layers.py``). They are imported
from ``--paper-path`` at run time — never copied into this repository — and called as the
paper's notebooks call them: ``fork((x * keep, keep, [1]))``, i.e. neighbour padding with as
many rounds as each kernel is wide before every convolution, the mask max-pooled with each
layer's own kernel.

For each architecture the paper has, one run times three models on the same batch and mask,
interleaved (order rotating per repeat, median of the per-repeat ratios): the plain
torchvision model, ``layer_mask`` of that same torchvision model (masktrain), and the fork
with the same weights. So the two ratios to the plain model, and masktrain against the
paper, are measured like for like. It also reports how far masktrain's logits are from the
fork's (relative error): ResNet-50 and EfficientNet-B0 compute the same function, DenseNet-121
does not (the fork's majority-vote concat and all-position head mean; docs/layer_masking.md).
"""
from __future__ import annotations

import importlib
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torchvision

from masktrain.layer_masking import layer_mask

#: timm-style benchmark name -> (paper module, its constructor, the torchvision twin)
FORKS: Dict[str, Tuple[str, str, Callable[[], torch.nn.Module]]] = {
    "resnet50": ("sal_resnet", "resnet50", torchvision.models.resnet50),
    "efficientnet_b0": ("efficientnet", "efficientnet_b0", torchvision.models.efficientnet_b0),
    "densenet121": ("densenet", "densenet121", torchvision.models.densenet121),
}


def check_paper_path(path: Path) -> Path:
    """``path`` if it holds the paper's forks; otherwise exit with a message saying what to fix."""
    path = Path(path).expanduser().resolve()
    missing = [f"{m}.py" for m in ("sal_layers", *(f[0] for f in FORKS.values())) if not (path / f"{m}.py").is_file()]
    if missing:
        sys.exit(f"--paper-path {path}: not a checkout of SriramB-98/layer_masking (missing {', '.join(missing)}); "
                 "clone https://github.com/SriramB-98/layer_masking and pass its directory")
    return path


def load_fork(arch: str, path: Path) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """``(fork, plain torchvision model)`` of ``arch`` with the same (deterministic random) weights, eval mode."""
    module_name, constructor, torchvision_model = FORKS[arch]
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # the forks import their siblings (sal_layers, misc, _utils) by bare name
    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    plain = torchvision_model().eval()
    fork = getattr(module, constructor)().eval()
    fork.load_state_dict(plain.state_dict(), strict=True)
    return fork, plain


def _rotating_triples(calls: List[Callable[[], torch.Tensor]], repeats: int, timed: Callable) -> List[List[float]]:
    """Per-call timings; one warm-up round, then ``repeats`` rounds with the call order rotated each round."""
    for call in calls:
        call()
    times: List[List[float]] = [[] for _ in calls]
    for r in range(repeats):
        order = [(r + i) % len(calls) for i in range(len(calls))]
        for i in order:
            times[i].append(timed(calls[i]))
    return times


def compare(arch: str, path: Path, x: torch.Tensor, keep: torch.Tensor, repeats: int, timed: Callable) -> Dict[str, float]:
    """Time plain / masktrain / paper fork for ``arch`` on ``x`` ``(B, 3, H, W)`` and ``keep`` ``(B, 1, H, W)``
    (eval, no_grad). Returns ``{"masktrain": ratio, "paper": ratio, "paper_over_masktrain": ratio, "rel_err": e}``."""
    fork, plain = load_fork(arch, path)
    device = x.device
    fork, plain = fork.to(device), plain.to(device)
    masked = layer_mask(plain)
    with torch.no_grad():
        ours = masked(x, keep)
        theirs = fork((x * keep, keep, [1]))
        rel_err = ((ours - theirs).norm() / theirs.norm()).item()
        calls = [lambda: plain(x), lambda: masked(x, keep), lambda: fork((x * keep, keep, [1]))]
        p, m, f = _rotating_triples(calls, repeats, timed)
    result = {
        "masktrain": statistics.median(b / a for a, b in zip(p, m)),
        "paper": statistics.median(c / a for a, c in zip(p, f)),
        "paper_over_masktrain": statistics.median(c / b for b, c in zip(m, f)),
        "rel_err": rel_err,
    }
    print(f"--- {arch} (torchvision) beside the paper's fork: plain {statistics.median(p) * 1e3:.1f} ms, "
          f"masktrain {statistics.median(m) * 1e3:.1f} ms ({result['masktrain']:.3f}x), "
          f"paper {statistics.median(f) * 1e3:.1f} ms ({result['paper']:.3f}x); "
          f"paper / masktrain {result['paper_over_masktrain']:.2f}x; logits rel. difference {rel_err:.1e}")
    return result


def compare_all(archs: List[str], path: Optional[Path], batch: Tuple[torch.Tensor, torch.Tensor], repeats: int,
                timed: Callable) -> Dict[str, Dict[str, float]]:
    """:func:`compare` for each of ``archs`` the paper has a fork of (others are named and skipped)."""
    if path is None:
        return {}
    path = check_paper_path(path)
    x, keep = batch
    out = {}
    for arch in archs:
        if arch not in FORKS:
            print(f"--- {arch}: the paper has no fork of it (it has {', '.join(FORKS)})")
            continue
        out[arch] = compare(arch, path, x, keep, repeats, timed)
    return out
