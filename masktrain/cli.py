"""Command-line plumbing shared by train.py and evaluate.py.

Hydra prints composition errors (unknown recipe, bad override) as several lines with a
search path; we compose once ourselves before Hydra starts so that every bad input ends
in one line naming the bad value, before any output directory exists.
"""
from __future__ import annotations

import itertools
import shutil
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from omegaconf import DictConfig

from masktrain.errors import UserError, find_user_error

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def _user_overrides(argv: Iterable[str]) -> list[str]:
    """Overrides that shape the job config (Hydra flags and hydra.* settings excluded)."""
    out = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key == "hydra" or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        out.append(arg)
    return out


def _expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Every combination of a ``-m`` sweep (``a=1,2 b=x,y``); plain overrides pass through."""
    choices = []
    for arg in overrides:
        key, value = arg.split("=", 1)
        bracketed = value.startswith("[") or value.startswith("{") or "(" in value
        parts = [value] if bracketed or "," not in value else value.split(",")
        choices.append([f"{key}={p}" for p in parts])
    return [list(c) for c in itertools.product(*choices)][:64]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            if "Could not find" in text and "Available options" in text:
                options = []
                for l in text.split("Available options", 1)[1].splitlines()[1:]:
                    if not l.startswith("\t"):
                        break
                    options.append(l.strip())
                return f"{line}; available: {', '.join(options)}" if options else line
            return line
    return type(exc).__name__


def store_probe_defaults() -> None:
    """Each probe's option defaults as the config group ``probe_defaults`` (recipes/evaluate.yaml
    composes it into ``probe_options``): the defaults live once, in the probe's ``Options``."""
    from hydra.core.config_store import ConfigStore

    from masktrain.probes import PROBES

    ConfigStore.instance().store(name="probe_defaults",
                                 node={"probe_options": {name: probe.default_options() for name, probe in PROBES.items()}})


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``recipes/<config_name>.yaml`` with overrides; errors become one-line UserErrors."""
    if config_name == "evaluate":  # its defaults list names the probes' option defaults
        store_probe_defaults()
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except Exception as exc:
        raise UserError(f"bad configuration: {_one_line(exc)}") from exc
    finally:
        GlobalHydra.instance().clear()


def preflight(config_name: str, argv: list[str], validate: Callable[[DictConfig], None],
              check_jobs: Callable[[list[DictConfig]], None] | None = None) -> None:
    """Compose and validate every job of the command line (and, with ``check_jobs``, the jobs
    together); exit 2 with one line on bad input."""
    try:
        jobs = []
        for overrides in _expand_sweeps(_user_overrides(argv)):
            jobs.append(compose(config_name, overrides))
            validate(jobs[-1])
        if check_jobs is not None:
            check_jobs(jobs)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def removed_on_user_error(output_dir: str | Path, keep_if: Callable[[Path], bool] = lambda p: False) -> Iterator[None]:
    """Remove the run's output directory when the block fails on bad input (a UserError
    anywhere in the chain: Hydra's instantiate wraps them) or is interrupted."""
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or find_user_error(exc) is not None:
            remove_run_dir(output_dir, keep_if)
        raise


def remove_run_dir(output_dir: str | Path, keep_if: Callable[[Path], bool] = lambda p: False) -> None:
    """Remove a run's output directory after a failure, unless ``keep_if`` says it holds results."""
    path = Path(output_dir)
    if path.is_dir() and not keep_if(path):
        shutil.rmtree(path, ignore_errors=True)
        # Drop empty parents Hydra made for this run (outputs/<name>/), never anything else.
        for parent in list(path.parents)[:2]:
            try:
                parent.rmdir()
            except OSError:
                break
