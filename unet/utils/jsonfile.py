"""JSON files that appear whole or not at all: written beside their path, then moved over it,
so a process killed mid-write leaves the previous file. Nothing here imports torch (the GPU
run's driver uses it too)."""

import json
import math
import os
from typing import Any


def clean_json(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (``json`` would write them, but they
    are not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def write_json(path: str, obj: object, clean: bool = False, **dump_kwargs) -> None:
    """
    Replace ``path`` with ``obj`` as JSON in one step (``path + ".tmp"``, then ``os.replace``).

    :param clean: write ``clean_json(obj)``: NaN/inf as null (strict JSON).
    :param dump_kwargs: passed to ``json.dump`` (e.g. ``indent=1``).
    """
    obj = clean_json(obj) if clean else obj
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **dump_kwargs)
    os.replace(tmp, path)
