"""A run's ``checkpoints/`` folder as a whole: which checkpoints it holds, how a finished
one is published (fsync, then one rename), which are rotated out, what an interrupted save
or deletion leaves behind and how that is cleaned, and what a starting run may do with the
folder. Plain files and renames (no torch).

Names in ``output_dir/checkpoints/``:
``checkpoint_<step:08d>`` a published checkpoint; ``.tmp-checkpoint_<step>`` one being
written; ``checkpoint_<step>.old`` the copy being replaced when the same step is saved
again; ``.del-checkpoint_<step>`` one being deleted (renamed first, so a deletion killed
half-way never leaves a half-empty folder under a checkpoint's name)."""

import os
import re
import shutil

from .config_rules import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")
TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"
OLD_SUFFIX = ".old"
# Files a folder must hold to be loadable as a checkpoint (weights and what they are).
REQUIRED_FILES = ("model.safetensors", "config.yaml")


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message is one line."""


def checkpoints_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def checkpoint_step(path):
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir):
    """Complete checkpoints of a run, lowest step first (temporary, old and half-deleted
    folders are not listed)."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if CHECKPOINT_RE.match(n))
    paths = [os.path.join(root, n) for n in names]
    return [p for p in paths if all(os.path.isfile(os.path.join(p, f)) for f in REQUIRED_FILES)]


def latest_checkpoint(output_dir):
    """The highest-step complete checkpoint folder under ``output_dir``, or None. (A run
    never leaves a checkpoint of a higher step than its own: see ``plan_start``.)"""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# --- writing ---------------------------------------------------------------------------

def fsync_path(path):
    """Flush one file or folder entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder):
    """Flush every file in ``folder`` and the folder itself, so that the rename that
    publishes it cannot reach the disk before its contents."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            fsync_path(path)
    fsync_path(folder)


def publish(tmp, final):
    """Rename the finished, flushed folder ``tmp`` into place as ``final`` (atomic on one
    file system) and flush the parent folder's entry. The same step saved again: the old
    copy is moved aside first, and ``clean_leftovers`` finishes a swap cut short."""
    if os.path.exists(final):
        old = final + OLD_SUFFIX
        os.replace(final, old)
        os.replace(tmp, final)
        remove_folder(old)
    else:
        os.replace(tmp, final)
    fsync_path(os.path.dirname(final))


def remove_folder(path):
    """Delete a checkpoint folder: renamed out of the listing first, then removed."""
    gone = os.path.join(os.path.dirname(path), DEL_PREFIX + os.path.basename(path))
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def rotate(output_dir, final, keep):
    """
    Keep ``final`` (the checkpoint just written) and the most recently written others, up
    to ``keep`` in all; recency is the folder's modification time (the last file written
    into it), not the step number. Returns the folders removed.
    """
    others = [c for c in list_checkpoints(output_dir) if os.path.realpath(c) != os.path.realpath(final)]
    others.sort(key=lambda c: (os.stat(c).st_mtime_ns, checkpoint_step(c)))
    drop = others[:max(0, len(others) - (keep - 1))]
    for c in drop:
        remove_folder(c)
    return drop


def clean_leftovers(output_dir):
    """
    Finish or undo what an interrupted save, swap or deletion left in the checkpoints folder:
    a swap cut short is completed (the new copy, complete before the swap began, is published)
    or undone (the old copy is put back); temporary and half-deleted folders are removed.
    Returns one line per action (empty if there was nothing to do).
    """
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    done = []
    for name in sorted(os.listdir(root)):
        if not (name.endswith(OLD_SUFFIX) and CHECKPOINT_RE.match(name[:-len(OLD_SUFFIX)])):
            continue
        final, old = os.path.join(root, name[:-len(OLD_SUFFIX)]), os.path.join(root, name)
        tmp = os.path.join(root, TMP_PREFIX + os.path.basename(final))
        if not os.path.exists(final):
            os.replace(tmp if os.path.isdir(tmp) else old, final)
            done.append(f"restored {os.path.basename(final)} after an interrupted save")
        if os.path.exists(old):
            remove_folder(old)
    for name in sorted(os.listdir(root)):
        if name.startswith((TMP_PREFIX, DEL_PREFIX)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            done.append(f"removed {name}, left by an interrupted save or deletion")
    return done


# --- what a starting run may do with the folder ------------------------------------------

def resolve_resume(resume, output_dir):
    """The checkpoint folder ``resume`` points to, or None to start fresh.

    :param resume: "" (fresh), "latest" (the newest in ``output_dir``; one must exist),
        "auto" (the newest if any, else fresh) or a checkpoint folder or a run's output_dir.
    """
    if not resume:
        return None
    if resume in ("latest", "auto"):
        path = latest_checkpoint(output_dir)
        if path is None and resume == "latest":
            raise CheckpointError(f"config key 'resume': no checkpoint in '{output_dir}' to continue "
                                  "(--resume auto starts fresh when there is none)")
        return path
    path = resume
    if checkpoint_step(path) is None:
        path = latest_checkpoint(path)  # an output_dir was given
    if path is None or not os.path.isfile(os.path.join(path, "train_state.json")):
        raise CheckpointError(f"config key 'resume': no complete checkpoint at '{resume}'")
    return path


def plan_start(cfg):
    """
    Where a run starts, and which checkpoints already in its ``output_dir`` it would leave
    behind: a fresh run leaves all of them, a resumed one those of a higher step than its
    start (or all, resuming another folder's checkpoint). Left there, they would be taken for
    this run's ("latest", sampling, export), so without ``overwrite`` that is refused.

    :return: (the checkpoint to resume or None, the folders ``overwrite`` removes).
    """
    path = resolve_resume(cfg.resume, cfg.output_dir)
    existing = list_checkpoints(cfg.output_dir)
    here = path is not None and os.path.realpath(os.path.dirname(path)) == os.path.realpath(
        checkpoints_root(cfg.output_dir))
    stale = [c for c in existing if not here or checkpoint_step(c) > checkpoint_step(path)]
    if stale and not cfg.overwrite:
        names = f"newest {os.path.basename(stale[-1])}"
        if path is None:
            raise ConfigError(f"output_dir '{cfg.output_dir}' already holds {len(stale)} checkpoint(s) ({names}): "
                              "continue them with --resume latest (or --resume auto), replace them with "
                              "--overwrite true, or choose a new --output_dir")
        raise ConfigError(f"resuming from '{path}' would leave {len(stale)} other checkpoint(s) in output_dir "
                          f"'{cfg.output_dir}' ({names}) to be mistaken for this run's: delete them with "
                          "--overwrite true, or choose a new --output_dir")
    return path, stale
