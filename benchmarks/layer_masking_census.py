"""Census: does layer masking convert the smallest model of every timm model module?

    python benchmarks/layer_masking_census.py                     # all of timm.list_modules()
    python benchmarks/layer_masking_census.py --modules resnet convnext --json census.json
    python benchmarks/layer_masking_census.py --budget 120 --threads 1

For each module (model family) of ``timm.list_modules()`` it picks the model with the fewest
parameters (counted on the meta device, nothing allocated), builds it with ``num_classes=10``,
and at 64² (or the model's fixed input size) checks the three properties of
:func:`masktrain.layer_masking.check.check_properties`: all-ones keep equals the plain output,
removed pixels are never read, finite training-mode gradients.

One line per family:

* ``ok`` — converted, all three properties hold;
* ``refused`` — :class:`~masktrain.errors.UserError` naming the op and module path (attention,
  token reshapes, ...); the expected outcome for transformers and hybrids;
* ``FAIL`` — converted but a property does not hold (a bug);
* ``CRASH`` — any other exception during conversion or the masked forward (a bug);
* ``timeout`` — the per-model budget (``--budget`` seconds) ran out;
* ``skipped`` — the plain model itself does not run at that size, or cannot be built.

Then a summary; ``--json PATH`` writes the table. Memory stays low: batch 2, one model at a time.
"""
from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import timm
import torch

from masktrain.errors import UserError
from masktrain.layer_masking import layer_mask
from masktrain.layer_masking.check import check_properties


class _Timeout(BaseException):  # not an Exception: broad handlers (plain-model probe) must not swallow it
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout()


@dataclass
class Row:
    module: str
    model: str
    params_m: float
    size: int
    status: str  # ok | refused | FAIL | CRASH | timeout | skipped
    detail: str
    seconds: float


def smallest_model(module: str) -> Tuple[Optional[str], float]:
    """The model of ``module`` with the fewest parameters (meta device), and that count in millions."""
    best, best_n = None, float("inf")
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, num_classes=10)
            n = sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001 - some models cannot be built on meta; try the next
            continue
        if n < best_n:
            best, best_n = name, n
        del model
    return best, best_n / 1e6


def _input_size(model: torch.nn.Module, default: int) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    return default


def _plain_runs(model: torch.nn.Module, size: int) -> bool:
    try:
        with torch.no_grad():
            model.eval()(torch.randn(2, 3, size, size))
        return True
    except Exception:  # noqa: BLE001
        return False


def census_one(module: str, size: int, budget: float) -> Row:
    start = time.perf_counter()
    name, params = smallest_model(module)
    if name is None:
        return Row(module, "-", 0.0, 0, "skipped", "no model builds on the meta device", time.perf_counter() - start)
    row = Row(module, name, round(params, 2), size, "", "", 0.0)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, num_classes=10)
        row.size = _input_size(model, size)
        if not _plain_runs(model, row.size):
            default = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
            if default != row.size and _plain_runs(model, default):
                row.size = default
            else:
                row.status, row.detail = "skipped", f"the plain model does not run at {row.size}²"
                return row
        masked = layer_mask(model)
        report = check_properties(model, size=row.size, batch=2, patch=8, tolerance=1e-5, masked=masked)
        if report.ok:
            row.status = "ok"
            row.detail = f"rel err {report.ones_rel_err:.1e}" + ("" if report.mask_changes_output else "; mask has no effect")
        else:
            row.status, row.detail = "FAIL", report.problems()
    except _Timeout:
        row.status, row.detail = "timeout", f"over the {budget:.0f} s budget"
    except UserError as exc:
        row.status, row.detail = "refused", str(exc).splitlines()[0][:400]
    except Exception as exc:  # noqa: BLE001 - a crash is what the census looks for
        tb = traceback.extract_tb(exc.__traceback__)
        at = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
        row.status, row.detail = "CRASH", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}{at}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        row.seconds = round(time.perf_counter() - start, 1)
        gc.collect()
    return row


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", nargs="*", help="timm model modules (default: timm.list_modules())")
    parser.add_argument("--size", type=int, default=64, help="input size unless the model has a fixed one")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per model (default 180)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the table as JSON to this path")
    parser.add_argument("--markdown", help="write the table as a markdown table to this path")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGALRM, _alarm)
    modules = args.modules or timm.list_modules()
    rows: List[Row] = []
    print(f"timm {timm.__version__}, torch {torch.__version__}, {len(modules)} modules, {args.size}² unless fixed, "
          f"batch 2, budget {args.budget:.0f} s/model, {args.threads} thread(s)", flush=True)
    for module in modules:
        row = census_one(module, args.size, args.budget)
        rows.append(row)
        print(f"{row.module:<24} {row.model:<40} {row.params_m:>8.2f}M {row.size:>4}²  {row.status:<8} {row.detail}"
              f"  [{row.seconds:.0f} s]", flush=True)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "refused", "FAIL", "CRASH", "timeout", "skipped")}
    print("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (of {len(rows)})")
    if args.json:
        with open(args.json + ".tmp", "w") as fh:
            json.dump({"timm": timm.__version__, "torch": torch.__version__, "size": args.size,
                       "rows": [asdict(r) for r in rows], "summary": counts}, fh, indent=1)
        import os

        os.replace(args.json + ".tmp", args.json)  # never a half-written table
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown_table(rows))
    return 1 if counts["CRASH"] or counts["FAIL"] else 0


def markdown_table(rows: List[Row]) -> str:
    """``| family | model | params | size | result |`` rows (details shortened to the op and path)."""
    lines = ["| family | smallest model | params | input | result |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        detail = r.detail.replace("layer masking does not support ", "").replace("|", "\\|")
        suffix = detail.rsplit(" (at ", 1)[1].rstrip(")") if detail.endswith(")") and " (at " in detail else ""
        detail = detail.split(": it ")[0].split(": no layer-masking rule")[0][:160] + (f" at {suffix}" if suffix else "")
        if r.status == "ok":
            result = "ok (mask has no effect: plain output input-insensitive at init)" if "no effect" in r.detail else "ok"
        else:
            result = f"{r.status}: {detail}"
        lines.append(f"| {r.module} | `{r.model}` | {r.params_m:.2f} M | {r.size}² | {result} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
