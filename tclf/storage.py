"""Files on any filesystem tf.io.gfile knows: the one way tclf reads, lists and writes them.

Every file tclf writes goes through :func:`staged` (or its two shorthands,
:func:`write_atomic` and :func:`publish`): the content goes to a temporary
name beside the target and is renamed over it when complete, so a reader
never sees half a file and an interrupted write leaves the old file as it
was. Local paths use the os module and never import TensorFlow (extraction
workers, the demo synthesizer and tools/ stay light); paths with a scheme
(gs://...) go through tf.io.gfile, whose errors are TensorFlow's (see :func:`errors`).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid

from tclf import InputError, faults


def is_remote(path: str) -> bool:
    return "://" in path


def join(*parts: str) -> str:
    """Path join that keeps URLs such as gs://bucket/x intact."""
    return posixpath.join(*parts) if is_remote(parts[0]) else os.path.join(*parts)


def makedirs(path: str) -> None:
    """Create the folder ``path`` and its parents; fine if it exists."""
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def make_new_dir(path: str) -> bool:
    """Create the folder ``path``; False if it exists. Locally atomic (of two processes, one
    gets it); object stores have no atomic mkdir, so there it is a best effort."""
    if is_remote(path):
        if _gfile().exists(path):
            return False
        _gfile().makedirs(path)
        return True
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def errors(path: str) -> tuple[type[BaseException], ...]:
    """The exception types a failed access to ``path`` raises: OSError, and for a remote path
    also tf.errors.OpError (imported only then). For ``except storage.errors(path)``."""
    if not is_remote(path):
        return (OSError,)
    import tensorflow as tf

    return (OSError, tf.errors.OpError)


def reason(error: BaseException) -> str:
    """Why an access failed, in words: an OSError's strerror, a tf.errors.OpError's message."""
    return str(getattr(error, "strerror", None) or getattr(error, "message", None) or error)


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def size(path: str) -> int:
    """The size of the file ``path`` in bytes."""
    return _gfile().stat(path).length if is_remote(path) else os.path.getsize(path)


def remove(path: str) -> None:
    """Delete the file ``path``; an error if it cannot be (see :func:`remove_quietly`)."""
    if is_remote(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def rename(source: str, target: str, overwrite: bool = False) -> None:
    """Move the file ``source`` to ``target`` on the same filesystem. Without ``overwrite`` an
    existing ``target`` is never replaced, even one created at the same moment: locally the file
    is hard-linked (which fails if the name exists: FileExistsError), then its old name removed;
    a filesystem without hard links gets a plain rename. Remotely: tf.io.gfile.rename."""
    if is_remote(source) or is_remote(target):
        _gfile().rename(source, target, overwrite=overwrite)
    elif overwrite:
        os.replace(source, target)
    else:
        try:
            os.link(source, target)
        except FileExistsError:
            raise
        except OSError:  # No hard links on this filesystem.
            if os.path.exists(target):
                raise
            os.rename(source, target)
            return
        os.remove(source)


def listdir(path: str) -> list[str]:
    """Names in the folder ``path`` (none if it is not a folder)."""
    if is_remote(path):
        return [n.rstrip("/") for n in _gfile().listdir(path)] if _gfile().isdir(path) else []
    return os.listdir(path) if os.path.isdir(path) else []


def rmtree(path: str, ignore_errors: bool = False) -> None:
    """Delete the folder ``path`` and everything in it, if it exists."""
    try:
        if is_remote(path):
            if _gfile().exists(path):
                _gfile().rmtree(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
    except Exception:  # noqa: BLE001
        if not ignore_errors:
            raise


def copytree(source: str, target: str, exclude=()) -> None:
    """Copy the folder ``source`` to the local folder ``target`` (new), leaving out the
    names in ``exclude``; ``source`` may be remote (files streamed by tf.io.gfile)."""
    if not is_remote(source):
        shutil.copytree(source, target, ignore=lambda _, names: [n for n in names
                                                                 if n in exclude])
        return
    os.makedirs(target)
    for name in listdir(source):
        if name in exclude:
            continue
        path = join(source, name)
        if _gfile().isdir(path):
            copytree(path, os.path.join(target, name), exclude)
        else:
            _gfile().copy(path, os.path.join(target, name))


def read_bytes(path: str) -> bytes:
    """The content of the file ``path``."""
    if is_remote(path):
        with _gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def local_copy(path: str):
    """Yield a local file name holding the file ``path``, for libraries that read local files
    only (h5py, Keras): a local path as it is; a remote file copied, under its own name (Keras
    picks the format from the extension), into a temporary folder removed afterwards."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tclf-") as folder:
        local = os.path.join(folder, posixpath.basename(path))
        _gfile().copy(path, local, overwrite=True)
        yield local


def _staging_name(path: str) -> str:
    """``dir/.name.tmp-<pid>-<random>.ext``: beside the target, hidden (a folder scan skips a
    leftover of a killed process), naming its writer (:func:`remove_dead_staging` clears a
    dead one's), and with its extension (Keras picks the format from it)."""
    folder, name = (posixpath if is_remote(path) else os.path).split(path)
    root, ext = os.path.splitext(name)
    return join(folder or ".", f".{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}{ext}")


_STAGING = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{12}(\.[^.]*)?$")


def remove_dead_staging(folder: str) -> list[str]:
    """Remove the staging files in a local ``folder`` whose writing process no longer runs
    (killed mid-write); returns their names. Remote folders are left alone (no pids)."""
    if is_remote(folder) or not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _STAGING.match(name)
        if match and not process_alive(int(match.group(1))):
            remove_quietly(os.path.join(folder, name))
            removed.append(name)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, killed and not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def read_json(path: str):
    """The JSON value in the file ``path``; a file that is not valid UTF-8 JSON is the
    user's to fix (InputError naming it)."""
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a valid JSON file ({error})") from None


def remove_quietly(path: str) -> None:
    """Delete the file ``path`` if it exists; errors are ignored (best-effort cleanup)."""
    try:
        if is_remote(path):
            if _gfile().exists(path):
                _gfile().remove(path)
        elif os.path.lexists(path):
            os.remove(path)
    except Exception:  # noqa: BLE001 - cleanup must not hide the original error
        pass


@contextlib.contextmanager
def staged(path: str):
    """Yield a local file name to write; when the block succeeds it replaces ``path``.

    Locally the staging file sits beside ``path`` and is renamed over it. For a remote
    ``path`` it is written in a local temporary folder, copied beside ``path`` and renamed
    there. On any failure (interruption included) the staging files are removed and
    ``path`` is untouched.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string, got {path!r}")
    if not is_remote(path):
        staging = _staging_name(path)
        try:
            yield staging
            faults.point("storage.staged_written")
            os.replace(staging, path)
        except BaseException:
            remove_quietly(staging)
            raise
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        yield local
        publish(local, path)


def write_atomic(path: str, data: bytes | str) -> None:
    """Write ``data`` (str: UTF-8) to ``path`` atomically."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ValueError(f"data must be bytes or str, got {type(data).__name__}")
    with staged(path) as staging, open(staging, "wb") as f:
        f.write(data)


def publish(source: str, target: str) -> None:
    """Copy the file ``source`` to ``target`` atomically (e.g. models/latest.h5)."""
    staging = _staging_name(target)
    try:
        if is_remote(source) or is_remote(target):
            _gfile().copy(source, staging, overwrite=True)
            _gfile().rename(staging, target, overwrite=True)
        else:
            shutil.copyfile(source, staging)
            faults.point(f"storage.publish_staged.{os.path.basename(target)}")
            os.replace(staging, target)
    except BaseException:
        remove_quietly(staging)
        raise
