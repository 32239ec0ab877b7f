"""Files: atomic writes (a temporary file in the target folder, then a rename, so a crash or a
failed write leaves the previous file intact), locks, the cache folder, checkpoint reading.
"""
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import tempfile
import time
from typing import Callable, Iterator, Optional

import torch

from .errors import UserError


class OutputWriteError(UserError, OSError):
    """Writing an output file failed; the message names the path and the reason."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file cannot be read; the message names it and the way out."""


class FolderBusy(UserError):
    """Another process writes the run folder."""


def cache_root(configured: str = "") -> str:
    """The toolkit's cache folder: the configured one (MODEL.FEATURE_CACHE_DIR), else
    $VLPROMPT_CACHE, else ~/.cache/vlprompt."""
    return os.path.expanduser(configured or os.environ.get("VLPROMPT_CACHE") or "~/.cache/vlprompt")


def read_cache(path: str, load: Callable[[str], object], report: Callable[[str], None] = print):
    """What `load` reads from the cache file `path`, or None when it is absent or cannot be read
    (truncated by a crash, another format): a cache miss, said once, never a crash."""
    if not path or not os.path.isfile(path):
        return None
    try:
        return load(path)
    except Exception as err:  # noqa: BLE001  any unreadable cache is recomputed, whatever the reader raised
        report(f"warning: cannot read the cache file {path} ({type(err).__name__}: {str(err)[:200]}); "
               f"recomputing it")
        return None


def read_tensor_cache(path: str, report: Callable[[str], None] = print):
    """A cache file written by atomic_torch_save, read on the CPU (read_cache: None if unreadable)."""
    return read_cache(path, lambda p: torch.load(p, map_location="cpu", weights_only=True), report)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise OutputWriteError(
            f"could not write {path}: {err.strerror or err}. The previous file, if any, is "
            f"unchanged; free disk space or make {folder} writable and rerun.") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def tensors_fingerprint(named_tensors) -> str:
    """sha256 over names, shapes, dtypes and bytes of tensors: identifies frozen weights."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        shape = tensor.shape
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _key_sample(keys, count: int = 4) -> str:
    """A few names of a state dict, layer numbers folded (encoder.resblocks.*.prompt_attn...)."""
    names = []
    for key in keys:
        name = re.sub(r"\.\d+(?=\.|$)", ".*", key)
        if name not in names:
            names.append(name)
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def written_by(state: dict, source: str) -> str:
    """Whose checkpoint `state` seems to be: a release whose key names a method's converter reads
    (narrowed by the file's folder), else the methods the path's trainer and folder name."""
    from .methods.registry import methods  # here: the registry imports every method module
    folder = os.path.basename(os.path.dirname(os.path.abspath(source)))
    releases = []
    for spec in methods():
        release = spec.release_checkpoint
        if release is None or not release.recognizes(state):
            continue
        try:
            release.convert(state)
        except Exception:  # noqa: BLE001  its converter refuses these keys: not that release
            continue
        releases.append(spec)
    releases = [s for s in releases if s.checkpoint_folder == folder] or releases
    # a release's trainer names first (CMPA, then DCP)
    readers = [(" or ".join(s.release_names) or s.name, [*s.release_names, s.name]) for s in releases]
    if len(readers) == 1:
        (name, trainers), = readers
        return (f"Its key names are those of the official {name} release's checkpoints: run it with --trainer "
                f"{' (or '.join(trainers)}{')' * (len(trainers) - 1)}, which converts them.")
    if readers:
        return ("Its key names are accepted by the release-checkpoint conversion of " + ", ".join(
            f"{name} (--trainer {' or '.join(trainers)})" for name, trainers in readers) +
            ": run it with the one whose release wrote it.")
    parts = set(os.path.abspath(source).split(os.sep))
    named = sorted({names[0] for s in methods() for names in s.trainer_names() if names[0] in parts})
    keeping = sorted(s.name for s in methods() if s.checkpoint_folder == folder)
    hints = ([f"its path names the trainer {' and '.join(named)}"] if named else []) + (
        [f"its folder {folder}/ is where {', '.join(keeping)} keep theirs"] if keeping else [])
    return (f"It looks like another method's checkpoint ({'; '.join(hints)}): " if hints
            else "It looks like another method's checkpoint: ") + \
        "run it with the --trainer (and config) that wrote it."


def load_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict(strict) with an error naming the mismatched keys and shapes, or, when no
    key matches at all, naming whose checkpoint the file seems to be."""
    expected = module.state_dict()
    if state and expected and not set(state) & set(expected):
        raise CheckpointError(
            f"{source} was not written for this model: none of its keys ({_key_sample(state)}) is a key of "
            f"{type(module).__name__} ({_key_sample(expected)}). {written_by(state, source)}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match this model's configuration (prompt length, depth, cross layer, "
            f"backbone?): missing keys {missing[:6]}, unexpected keys {unexpected[:6]}, "
            f"shape mismatches {wrong[:6]}")
    module.load_state_dict(state)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive lock on `path` (created if needed) between processes, held for the block; the
    kernel releases it if the holder dies. POSIX locks (lockf) also hold across NFS clients."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def read_checkpoint(path: str, trust_pickle: bool = False, trust_key: str = "trust_pickle") -> dict:
    """A checkpoint dict, read on the CPU with torch.load(weights_only=True); checkpoints that
    pickle Python objects (the releases' Dassl pickles its LR scheduler) only with `trust_pickle`,
    since full unpickling can run code stored in the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not trust_pickle:
            raise CheckpointError(
                f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Checkpoints of the official releases pickle "
                f"Python objects (the LR scheduler), and full unpickling can execute code from the file: if you "
                f"trust it, set {trust_key} True.") from err
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


RUN_LOCK = ".lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_holder(path: str, attempts: int = 20) -> Optional[dict]:
    """The lock's owner, or None if the file stays unreadable (a writer that died mid-write)."""
    for _ in range(attempts):
        try:
            with open(path) as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, OSError):
            time.sleep(0.05)  # its creator may be writing it right now
    return None


def _stale(holder: dict, host: str) -> str:
    """Why a lock's owner is gone ('' if it may be alive)."""
    if holder.get("host") == host and not _process_alive(int(holder.get("pid", -1))):
        return f"process {holder.get('pid')} on {host} is no longer running"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job:
        return f"it belongs to an earlier run of this Slurm job ({job}), which was requeued"
    return ""


@contextlib.contextmanager
def exclusive_folder(folder: str, report: Callable[[str], None] = print) -> Iterator[None]:
    """While the block runs, only this process writes `folder` (a Slurm requeue and a manual rerun
    must not train into one run folder). The lock names its holder's host and process; one left by
    a dead process on this host, or by an earlier run of the same Slurm job, is taken over."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN_LOCK)
    host = socket.gethostname()
    me = {"host": host, "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _read_holder(path)
            if holder == {}:
                continue  # released meanwhile
            reason = _stale(holder, host) if holder is not None else ""
            if not reason:
                who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')}"
                       f"{', Slurm job ' + holder['slurm_job'] if holder.get('slurm_job') else ''})"
                       if holder else "a process whose lock file cannot be read")
                raise FolderBusy(f"{folder} is in use by {who}: two runs must not write one folder. Wait for "
                                 f"it to finish or, if that process is gone, delete {path}")
            report(f"Taking over {path}: {reason}")
            os.remove(path)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(me))
    try:
        yield
    finally:
        if (_read_holder(path, attempts=1) or {}).get("pid") == me["pid"]:
            os.remove(path)
