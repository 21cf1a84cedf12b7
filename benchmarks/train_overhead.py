"""The main job's wall time against the plain compute it needs, measured in one run.

    python benchmarks/train_overhead.py                                # python train.py recipe=mask_aug
    python benchmarks/train_overhead.py trainer.max_epochs=2           # any train.py overrides
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/train_overhead.py   # AVX2 kernels on an AVX-512 CPU

1. Runs ``python train.py recipe=mask_aug <overrides>`` as a user does (a fresh process:
   imports, config checks, W&B offline, data, masks, validation, checkpoints, test), with
   Lightning's SimpleProfiler attached, and times its wall clock.
2. In this process, with the run's own config: times the same number of plain training steps
   (forward, cross-entropy, backward, AdamW step with the job's
   parameter groups, LR schedule step) of the same model, batch shape and memory
   format on random tensors, and the pieces the job adds around them — generating the
   batches, drawing masks + filling, the validation and test forward passes.
3. Prints ``overhead = job wall / plain steps`` (goal <= 1.15x), the profile (where the
   job's time went, as seconds and as a share of the wall), and the profiler's top rows.

Both measurements share the machine state of one run; on a machine shared with other jobs
compare ratios, not seconds. ``--plain-steps K`` times K plain steps and scales to the job's
step count (quicker, marked as such in the output).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_description() -> str:
    """CPU model, core count and the vector width torch's kernels use (ATEN_CPU_CAPABILITY aware)."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "default")
    return f"{model}, {os.cpu_count()} cores, torch kernels {isa}, oneDNN max ISA {onednn}, {torch.get_num_threads()} threads"


def run_job(overrides: list[str], workdir: Path) -> tuple[float, Path, str]:
    """(wall seconds, run dir, combined output) of ``python train.py recipe=mask_aug <overrides>``."""
    run_dir = workdir / "run"
    profiler = ("+trainer.profiler={_target_:lightning.pytorch.profilers.SimpleProfiler,"
                f"dirpath:{workdir},filename:profile}}")
    cmd = [sys.executable, str(REPO / "train.py"), "recipe=mask_aug", *overrides, f"hydra.run.dir={run_dir}", profiler]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"the job failed (exit {proc.returncode}):\n{output[-3000:]}")
    return wall, run_dir, output


def profiler_rows(path: Path) -> dict[str, float]:
    """``{action: total seconds}`` from a SimpleProfiler report file."""
    rows: dict[str, float] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        # "|  action\t|  mean\t|  calls\t|  total\t|  percent\t|" (extended, the default) or
        # "|  action\t|  mean\t|  total\t|"
        cells = [c.strip() for c in line.split("|")]
        if len(cells) not in (5, 7) or not cells[1] or cells[1] == "Action":
            continue
        try:
            rows[cells[1]] = float(cells[4] if len(cells) == 7 else cells[3])
        except ValueError:
            continue
    return rows


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_pieces(cfg, steps: int, plain_steps: int | None) -> dict[str, float]:
    """Seconds for ``steps`` plain training steps and for each piece the job adds, in this process."""
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate

    from masktrain.lit_module import make_optimizer
    from masktrain.malloc_tuning import keep_freed_memory
    from masktrain.methods import FillMethod, get_method
    from masktrain.rng import step_generator
    from masktrain.training import build_masks

    keep_freed_memory()  # as train.py does: the plain steps get the job's allocator settings
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, checkpoint_path=None)
    # The job's optimizer (same parameter groups, fused) and a per-step schedule as the job steps
    # its LambdaLR: the plain step must do every update the job's step does.
    opt = make_optimizer(model, float(cfg.optim.lr), float(cfg.optim.weight_decay))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    batch, size = int(cfg.data.batch_size), int(cfg.data.dataset.image_size)
    k = int(cfg.data.num_classes)
    images, labels = torch.rand(batch, 3, size, size), torch.randint(0, k, (batch,))

    def plain_step() -> None:
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()

    model.train()
    plain_step()  # warm-up: oneDNN picks its kernels on the first call
    n = plain_steps or steps
    start = time.perf_counter()
    for _ in range(n):
        plain_step()
    plain = (time.perf_counter() - start) * steps / n
    out = {"plain": plain, "plain_measured_steps": float(n)}

    augment, val_mask = build_masks(cfg.mask)
    method = get_method(str(cfg.mask.method), tuple(datamodule.mean))
    train_set = datamodule.dataset("train")
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, num_workers=0)
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:  # a small train split: start it again
            state["it"] = iter(loader)
            return next(state["it"])

    first = next_batch()
    repeats = 5
    out["data"] = _median_time(next_batch, repeats) * steps
    batch_labels, objects = first[1], first[2]
    num_classes = int(datamodule.num_classes)
    if augment is not None:
        target = images.clone()

        def masks() -> None:  # layer masking's cost is inside its forward pass: only the draw here
            g = step_generator(0, 0, 0)
            masked = augment.inputs(target, batch_labels, objects, g, method, num_classes, lazy=True)
            if isinstance(method, FillMethod):
                method.apply(masked.images, masked.keep, g, inplace=True)
        out["masks"] = _median_time(masks, repeats) * steps
    else:
        out["masks"] = 0.0

    # Validation every epoch and one test pass: clean + masked forward of every image.
    model.eval()
    eval_batch = int(cfg.data.get("eval_batch_size") or 2 * batch)
    x = torch.rand(eval_batch, 3, size, size)
    obj = torch.zeros(eval_batch, 1, size, size)
    eval_labels = torch.zeros(eval_batch, dtype=torch.int64)

    def eval_batch_pass() -> None:
        with torch.no_grad():
            model(x)
            g = step_generator(0, 0, 0)
            masked = val_mask.inputs(x, eval_labels, obj, g, method, num_classes)
            method.logits(model, masked.images, masked.keep, g)

    per_batch = _median_time(eval_batch_pass, 3)
    epochs = int(cfg.trainer.max_epochs)
    n_val, n_test = len(datamodule.dataset("val")), len(datamodule.dataset("test"))
    limit_val = cfg.trainer.get("limit_val_batches")
    val_batches = -(-n_val // eval_batch)
    if isinstance(limit_val, int):
        val_batches = min(val_batches, limit_val)
    out["validation"] = per_batch * val_batches * epochs
    out["test"] = per_batch * -(-n_test // eval_batch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. trainer.max_epochs=2 logger=csv")
    parser.add_argument("--plain-steps", type=int, default=None,
                        help="time this many plain steps and scale to the job's count (default: all of them)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    print(f"machine: {cpu_description()}")
    print(f"torch {torch.__version__}; job: python train.py recipe=mask_aug {' '.join(args.overrides)}")
    with tempfile.TemporaryDirectory(prefix="masktrain-overhead-") as tmp:
        workdir = Path(tmp)
        wall, run_dir, output = run_job(args.overrides, workdir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        cfg = OmegaConf.load(run_dir / "config.yaml")
        rows = profiler_rows(workdir / "fit-profile.txt")
        test_rows = profiler_rows(workdir / "test-profile.txt")
    steps = int(metrics["global_step"])
    pieces = measure_pieces(cfg, steps, args.plain_steps)
    plain = pieces["plain"]
    # The profiler's "Total" counts from its creation (when the trainer is built), so the test
    # report's Total spans fit + test: what lies outside it is start-up and teardown.
    inside = test_rows.get("Total", rows.get("Total", 0.0))
    print(f"\njob: {steps} steps of batch {cfg.data.batch_size} at {cfg.data.dataset.image_size}², "
          f"model {cfg.model.name} (channels_last={cfg.model.get('channels_last', False)}), "
          f"data workers {cfg.data.num_workers}, logger {cfg.logger.get('_target_', 'none') if cfg.get('logger') else 'none'}")
    print(f"job wall {wall:8.1f} s   test/acc_clean {metrics.get('test/acc_clean', float('nan')):.4f}")
    scaled = "" if not args.plain_steps else f" (timed {args.plain_steps}, scaled)"
    print(f"plain    {plain:8.1f} s   {steps} forward+backward+AdamW steps, same model and batch{scaled}")
    ratio = wall / plain
    print(f"overhead = job wall / plain steps = {ratio:.3f}x   (goal <= 1.15x: {'met' if ratio <= 1.15 else 'not met'})")

    print("\nprofile (share of the job's wall; pieces timed in this process, the rest from the job's profiler):")
    startup = wall - inside
    checkpoints = rows.get("save_checkpoint", 0.0)
    grid = sum(v for a, v in rows.items() if a.startswith("[Callback]MaskedSampleGrid"))
    table = [
        ("model compute (plain steps)", plain),
        ("data generation (train batches, in-process)", pieces["data"]),
        ("masks + fill (train batches)", pieces["masks"]),
        ("validation forward (clean + masked, every epoch)", pieces["validation"]),
        ("test forward (clean + masked, once)", pieces["test"]),
        ("checkpoints (job profiler: save_checkpoint)", checkpoints),
        ("sample grids (job profiler: MaskedSampleGrid)", grid),
        ("start-up + teardown (imports, config, data, W&B; outside the trainer)", startup),
    ]
    for name, seconds in table:
        print(f"  {name:70s} {seconds:8.1f} s  {100 * seconds / wall:5.1f}%")
    rest = wall - sum(s for _, s in table)
    print(f"  {'rest (Lightning loop, metric logging, noise between the two measurements)':70s} {rest:8.1f} s  {100 * rest / wall:5.1f}%")
    if rows:
        print("\njob profiler, top actions by total time (nested: a row includes the rows it calls):")
        for action, seconds in sorted(((a, s) for a, s in rows.items() if a != "Total"), key=lambda r: -r[1])[:14]:
            print(f"  {action[:78]:78s} {seconds:8.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"wall": wall, "steps": steps, "ratio": ratio, **pieces, "startup": startup,
                                         "profiler": rows, "machine": cpu_description()}, indent=2))


if __name__ == "__main__":
    main()
