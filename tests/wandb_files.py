"""Read a W&B offline run the way ``wandb sync`` does: its ``run-<id>.wandb`` transaction log.

wandb ≥ 0.19 writes the config and summary of an offline run only into that log (``files/``
holds ``config.yaml`` only after syncing), so tests read the log itself: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0) followed by LevelDB-log blocks of 32 KiB whose records
(4-byte CRC, 2-byte length, 1-byte type: full/first/middle/last) carry protobuf ``Record``s.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

HEADER, BLOCK = 7, 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if pos + 7 + length > len(data):  # a record cut off by a killed writer
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _finished(log: Path) -> bool:
    """Whether the transaction log holds its ``exit`` record (written once ``run.finish()`` is done)."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        for payload in _payloads(log):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "exit":
                return True
    except Exception:  # a record still being written
        return False
    return False


def read_finished_offline_run(run_dir: Path, timeout: float = 60.0) -> dict[str, Any]:
    """:func:`read_offline_run` once the log is complete. In the process that logged the run,
    ``wandb.finish()`` can return before wandb-core has written the log out (a subprocess's exit
    waits for it), so an in-process test waits for the ``exit`` record."""
    import time

    (log,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while not _finished(log):
        assert time.monotonic() < deadline, f"{log} has no exit record after {timeout} s"
        time.sleep(0.1)
    return read_offline_run(run_dir)


def read_offline_run(run_dir: Path, partial: bool = False) -> dict[str, Any]:
    """``{"run": {id, name, group, job_type}, "config": {...}, "history": [{key: value}], "summary": {...}}``.

    ``partial=True`` reads the log of a killed process up to its last complete record."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(run_dir).glob("run-*.wandb")
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}}

    def items(updates) -> dict[str, Any]:
        return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}

    from google.protobuf.message import DecodeError

    for payload in _payloads(log):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError:
            if not partial:
                raise
            break  # the record the process was writing when it was killed
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out["run"] = {"id": r.run_id, "name": r.display_name, "group": r.run_group, "job_type": r.job_type}
            out["config"].update(items(r.config.update))
        elif kind == "config":
            out["config"].update(items(record.config.update))
        elif kind == "history":
            out["history"].append(items(record.history.item))
        elif kind == "summary":
            out["summary"].update(items(record.summary.update))
    out["config"].pop("_wandb", None)
    return out
