"""Atomic writes: a file (or a directory of files) appears complete or not at all.

Everything is written to a temporary sibling first and moved into place with ``os.replace``
(atomic on one filesystem), so a crash or a kill never leaves a truncated file behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

Content = Union[str, bytes, Callable[[Path], None]]


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` to ``path`` atomically; returns the path.

    ``content`` is text, bytes, or a writer ``fn(tmp_path)`` that writes the file itself
    (``torch.save``, ``fig.savefig``, ``save_image``); the temp name keeps ``path``'s suffix,
    so writers that pick the format from it still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextmanager
def atomic_directory(out: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success its files move into ``out``
    (``last`` moves last, so its presence marks a complete directory); on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            return
        for name in sorted(os.listdir(tmp), key=lambda n: n == last):
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
