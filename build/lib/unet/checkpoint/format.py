"""What a checkpoint folder holds, and the checks that it holds it.

A checkpoint is ``checkpoint_<step:08d>/`` under a run's ``output_dir/checkpoints/``:

- ``model.safetensors`` (the UNetModel's keys) and ``ema_<rate>.safetensors`` per EMA rate;
- ``config.yaml``, the training config, as a plain mapping here;
- ``train_state.json`` (+ ``train_state.safetensors`` for its tensors): the step and the run's
  stateful parts, checked against ``TRAIN_STATE_SCHEMA`` before anything reads it;
- accelerate's ``optimizer.bin``, ``scheduler.bin``, ``random_states_<i>.pkl`` (pickles, read
  by torch's restricted ``weights_only`` unpickler);
- ``manifest.json``, written last: the schema version, what the model is (``architecture``:
  image size, UNetModel and diffusion arguments, EMA rates, the null label), and every other
  file's size and sha256. A reader checks the files it reads against it, so a truncated,
  replaced or bit-flipped file is one line naming it instead of a model that silently differs.

This module knows nothing of training: it reads and checks files. The run folder (publishing,
rotation, resume) is ``unet.train.checkpoint``'s.
"""

import hashlib
import json
import os
import re

import torch
import yaml

from unet.utils.yamlfile import strict_load

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "train_state.json"
STATE_TENSORS_FILE = "train_state.safetensors"
RNG_FILE = "random_states_{}.pkl"  # accelerate's RNG state of process i
ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin")  # read with torch.load(weights_only=True)
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")
# Files a folder must hold to be listed as a checkpoint (weights and what they are).
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE)
HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message is one line."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def ema_filename(rate: float) -> str:
    return f"ema_{rate:g}.safetensors"


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def checkpoint_step(path: str) -> "int | None":
    """The step a ``checkpoint_<step>`` folder's name says, or None."""
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints of a run, lowest step first (temporary, old and half-deleted
    folders are not listed)."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if CHECKPOINT_RE.match(n))
    paths = [os.path.join(root, n) for n in names]
    return [p for p in paths if all(os.path.isfile(os.path.join(p, f)) for f in REQUIRED_FILES)]


def latest_checkpoint(output_dir: str) -> "str | None":
    """The highest-step complete checkpoint folder under ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# --- the manifest ------------------------------------------------------------------------

def file_digest(path: str) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def jsonable(value: object) -> object:
    """Tuples as lists, recursively (what JSON gives back, so a record compares equal)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def architecture_record(image_size: int, model_kwargs: dict, diffusion_kwargs: dict, ema_rates: list,
                        null_class_label: "int | None") -> dict:
    """What the model is, as the manifest keeps it: enough to build and sample it without the
    training config."""
    return jsonable(dict(image_size=image_size, model=model_kwargs, diffusion=diffusion_kwargs,
                         ema_rates=[float(r) for r in ema_rates], null_class_label=null_class_label))


def write_manifest(folder: str, architecture: dict) -> dict:
    """Write ``manifest.json`` listing every file now in ``folder`` (size, sha256); call it
    after the last other file is written and before the folder is published."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name != MANIFEST_FILE and os.path.isfile(path):
            files[name] = {"size": os.path.getsize(path), "sha256": file_digest(path)}
    manifest = {"schema": SCHEMA_VERSION, "architecture": architecture, "files": files}
    with open(os.path.join(folder, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifest(folder: str) -> dict:
    """The checked ``manifest.json`` of ``folder``; a one-line ``CheckpointError`` if it is
    missing, unreadable, of another schema, or malformed."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{folder}': {MANIFEST_FILE} is missing (not a complete checkpoint, or "
                              "one written before manifests: python scripts/add_manifest.py FOLDER gives it one)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{folder}': {MANIFEST_FILE} is unreadable ({one_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_VERSION:
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        raise CheckpointError(f"checkpoint '{folder}': {MANIFEST_FILE} has schema {schema!r}, this version reads "
                              f"schema {SCHEMA_VERSION}")
    files, arch = manifest.get("files"), manifest.get("architecture")
    ok_files = isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values())
    ok_arch = isinstance(arch, dict) and isinstance(arch.get("image_size"), int) and all(
        isinstance(arch.get(k), dict) for k in ("model", "diffusion")) and isinstance(arch.get("ema_rates"), list)
    if not (ok_files and ok_arch):
        raise CheckpointError(f"checkpoint '{folder}': {MANIFEST_FILE} is malformed (expected 'files' with size "
                              "and sha256 per file, and 'architecture')")
    return manifest


def verify_files(folder: str, manifest: dict, names: "list | None" = None) -> None:
    """Check ``names`` (default: every file the manifest lists) against it: present, of the
    recorded size, of the recorded sha256. The first mismatch is one line naming the file."""
    files = manifest["files"]
    for name in files if names is None else names:
        path = os.path.join(folder, name)
        if name not in files:
            raise CheckpointError(f"checkpoint '{folder}': {name} is not in its {MANIFEST_FILE}")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint '{folder}': {name} is missing")
        size = os.path.getsize(path)
        if size != files[name]["size"]:
            raise CheckpointError(f"checkpoint '{folder}': {name} is {size} bytes, its manifest says "
                                  f"{files[name]['size']} (truncated or replaced)")
        if file_digest(path) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint '{folder}': {name} does not match its sha256 in {MANIFEST_FILE} "
                                  "(corrupted on disk or edited)")


# --- the config and the training state ----------------------------------------------------

def read_config_mapping(folder: str) -> dict:
    """The checkpoint's ``config.yaml`` as a mapping; empty, not YAML or not a mapping is one
    line (an empty file is never "all defaults": the model would be built wrong)."""
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            d = strict_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"checkpoint '{folder}': {CONFIG_FILE} is unreadable ({one_line(e)})") from None
    if not isinstance(d, dict) or not d:
        raise CheckpointError(f"checkpoint '{folder}': {CONFIG_FILE} is "
                              f"{'empty' if not d else 'not a mapping of key: value'}")
    return d


# The keys of ``train_state.json`` a reader relies on, and their JSON types (schema 1). A
# part of the run absent from a run (power EMAs, a stream, sample quality) is absent here.
TRAIN_STATE_SCHEMA = {
    "step": int, "nan_skipped": int, "nan_streak": int, "elapsed_seconds": (int, float), "spikes": dict,
    "divergence": dict, "sampler": dict, "ema_steps": dict, "num_processes": int, "memory_format": str,
}
OPTIONAL_STATE = {"quality": dict, "phema": dict, "stream": list}


def check_train_state(state: object, where: str, required: "dict | None" = None) -> dict:
    """``state`` (a parsed ``train_state.json``) checked against the schema: a mapping with
    every ``required`` key (default ``TRAIN_STATE_SCHEMA``) of its type; one line naming the
    first key at fault."""
    required = TRAIN_STATE_SCHEMA if required is None else required
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: {STATE_FILE} holds a {type(state).__name__}, not a mapping")
    for key, typ in {**required, **{k: t for k, t in OPTIONAL_STATE.items() if k in state}}.items():
        if key not in state:
            raise CheckpointError(f"{where}: {STATE_FILE} has no '{key}'")
        value = state[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise CheckpointError(f"{where}: {STATE_FILE} key '{key}' is {value!r}, expected {names}")
    if "step" in state and state["step"] < 0:
        raise CheckpointError(f"{where}: {STATE_FILE} key 'step' is {state['step']}, expected >= 0")
    return state


def read_train_state(folder: str, required: "dict | None" = None) -> dict:
    """The checked ``train_state.json`` of ``folder`` (tensors not joined)."""
    try:
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{folder}': {STATE_FILE} is unreadable ({one_line(e)})") from None
    return check_train_state(state, f"checkpoint '{folder}'", required)


def split_state(state: dict, prefix: str, tensors: dict) -> dict:
    """JSON-able part of a (nested) state dict; tensors go to ``tensors`` under dotted keys."""
    out = {}
    for k, v in state.items():
        key = f"{prefix}.{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous()
            out[k] = {"__tensor__": key}
        elif isinstance(v, dict):
            out[k] = split_state(v, key, tensors)
        elif hasattr(v, "tolist"):  # numpy arrays and scalars
            out[k] = v.tolist()
        else:
            out[k] = v
    return out


def join_state(state: object, tensors: dict) -> object:
    """``split_state`` undone: every ``{"__tensor__": key}`` replaced by its tensor."""
    if isinstance(state, dict):
        if set(state) == {"__tensor__"}:
            if state["__tensor__"] not in tensors:
                raise CheckpointError(f"{STATE_TENSORS_FILE} has no tensor '{state['__tensor__']}'")
            return tensors[state["__tensor__"]]
        return {k: join_state(v, tensors) for k, v in state.items()}
    if isinstance(state, list):
        return [join_state(v, tensors) for v in state]
    return state
