"""Read what an offline wandb run recorded, from its ``run-*.wandb`` file.

wandb 0.31 offline writes no ``wandb-summary.json``; the run lives in a binary file: a
7-byte header (``:W&B`` and version bytes), then LevelDB-log records in 32 KiB blocks,
each with a 7-byte header (masked CRC32C u32, length u16 LE, type u8: 1 full, 2 first,
3 middle, 4 last) and a payload that is a ``wandb_internal_pb2.Record``. Tests use this
to assert what a run logged (users read their runs with ``wandb sync DIR``, which uploads
the same file, so this lives with the tests, not in the package)."""

import glob
import json
import os
import struct
from dataclasses import dataclass, field

BLOCK = 32 * 1024
FILE_HEADER = 7
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What a run recorded: ``history`` (one dict per logged step, with ``_step``), the
    ``config`` and ``summary`` dicts, and the run's ``name``, ``group``, ``tags`` and ``run_id``."""

    history: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    name: str = ""
    group: str = ""
    tags: list = field(default_factory=list)
    run_id: str = ""


def iter_payloads(data):
    """The record payloads of a LevelDB-log byte string (after the file header)."""
    if data[:4] != b":W&B":
        raise ValueError("not a wandb run file (missing ':W&B' header)")
    pos, parts = FILE_HEADER, []
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        payload = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            parts = [payload]
        elif kind == MIDDLE:
            parts.append(payload)
        elif kind == LAST:
            parts.append(payload)
            yield b"".join(parts)
            parts = []
        else:
            raise ValueError(f"corrupt wandb run file: record type {kind} at byte {pos}")


def _put(target, item, value):
    """Store an item under its key; wandb splits nested values (an image's metadata, a
    dict) into a ``nested_key`` path, which becomes nested dicts here."""
    path = [item.key] if item.key else list(item.nested_key)
    for k in path[:-1]:
        target = target.setdefault(k, {})
    target[path[-1]] = value


def _items(items, target, unwrap=False):
    for i in items:
        value = json.loads(i.value_json)
        if unwrap and isinstance(value, dict) and "value" in value:  # config: {"value": v, "desc": ...}
            value = value["value"]
        _put(target, i, value)
    return target


def read_run(path):
    """
    Decode an offline run.

    :param path: a ``run-*.wandb`` file, an ``offline-run-*`` folder, or a folder containing
        ``wandb/`` (the newest run found is read).
    :return: an ``OfflineRun``.
    """
    from wandb.proto import wandb_internal_pb2

    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "run-*.wandb"), recursive=True), key=os.path.getmtime)
        if not found:
            raise FileNotFoundError(f"no run-*.wandb file under '{path}'")
        path = found[-1]
    with open(path, "rb") as f:
        data = f.read()
    run = OfflineRun()
    for payload in iter_payloads(data):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_items(rec.history.item, {}))
        elif kind == "config":
            _items(rec.config.update, run.config, unwrap=True)
        elif kind == "summary":
            _items(rec.summary.update, run.summary)
        elif kind == "run":
            run.name = rec.run.display_name or rec.run.run_id
            run.group = rec.run.run_group
            run.tags = list(rec.run.tags)
            run.run_id = rec.run.run_id
            _items(rec.run.config.update, run.config, unwrap=True)
    return run
