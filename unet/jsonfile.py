"""JSON files that appear whole or not at all: written beside their path, then moved over it,
so a process killed mid-write leaves the previous file. Nothing here imports torch (the GPU
run's driver uses it too)."""

import json
import os


def write_json(path, obj, **dump_kwargs):
    """
    Replace ``path`` with ``obj`` as JSON in one step (``path + ".tmp"``, then ``os.replace``).

    :param dump_kwargs: passed to ``json.dump`` (e.g. ``indent=1``).
    """
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **dump_kwargs)
    os.replace(tmp, path)
