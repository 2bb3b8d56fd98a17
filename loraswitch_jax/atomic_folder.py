"""Replacing a folder as a whole: write into a temporary sibling, then swap it in by renames.

At every instant the path holds the old complete folder or the new one; a crash between the two
renames leaves the old one aside, which :func:`interrupted_save` names. Used by the weight and
adapter savers (``weights.save_params``, ``adapter_io``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable

__all__ = ["interrupted_save", "write_folder_atomic"]

_SAVING, _ASIDE = ".saving-", ".replaced-"
# Leftovers of another host older than this process cannot be a save in progress that we know of.
_PROCESS_START = time.time()


def _usual_mode(directory: bool) -> int:
    """``0666 & ~umask`` for files, ``0777 & ~umask`` for folders (what ``open`` would give)."""
    mask = os.umask(0)  # the umask is read by setting it; restore it at once
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _sibling(folder: str, kind: str) -> str:
    """A new empty folder beside ``folder``, named after it, this host and this process."""
    parent, name = os.path.split(folder)
    prefix = f".{name}{kind}{os.getpid()}@{socket.gethostname()}-"
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def _leftovers(folder: str, kind: str) -> list[tuple[str, int, str]]:
    """``(path, pid, host)`` of every ``kind`` sibling of ``folder`` an earlier write made."""
    parent, name = os.path.split(folder)
    pattern = re.compile(re.escape(f".{name}{kind}") + r"(\d+)@(.*)-[^-]*")
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    for fn in entries:
        m = pattern.fullmatch(fn)
        if m:
            found.append((os.path.join(parent, fn), int(m.group(1)), m.group(2)))
    return found


def _is_stale(path: str, pid: int, host: str) -> bool:
    """Whether the writer of leftover ``path`` is gone (pid dead here; else older than us)."""
    if host == socket.gethostname():
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    try:
        return os.lstat(path).st_mtime < _PROCESS_START
    except OSError:
        return False


def _remove_leftovers(folder: str) -> None:
    """Remove what interrupted writes to ``folder`` left beside it (their writers are gone)."""
    for kind in (_SAVING, _ASIDE):
        for path, pid, host in _leftovers(folder, kind):
            if _is_stale(path, pid, host):
                shutil.rmtree(path, ignore_errors=True)


def interrupted_save(folder: str | os.PathLike) -> str | None:
    """A message when ``folder`` is missing because a save was interrupted between its two
    renames (the previous version is in an aside-folder beside it); ``None`` otherwise."""
    folder = os.path.realpath(os.fspath(folder))
    if os.path.exists(folder):
        return None
    asides = [path for path, _, _ in _leftovers(folder, _ASIDE)]
    if not asides:
        return None
    return (
        f"{folder!r} is missing: a save to it was interrupted, and its previous version is in "
        f"{asides[0]!r}; rename that folder back to {folder!r} (or save again)"
    )


def _carry_over(old: str, new: str, owned: Callable[[str], bool]) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` this writer does not own."""
    present = set(os.listdir(new))
    for fn in os.listdir(old):
        if fn in present or owned(fn) or fn.startswith((_SAVING, _ASIDE)):
            continue  # ours, replaced; or a leftover of the in-folder temp layout of old versions
        src, dst = os.path.join(old, fn), os.path.join(new, fn)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def write_folder_atomic(
    folder: str | os.PathLike,
    write: Callable[[str], None],
    owned: Callable[[str], bool] = lambda fn: True,
) -> None:
    """Replace ``folder`` as a whole by what ``write(tmp)`` puts into a new sibling folder.

    ``write`` fills the temporary folder; the entries of the old folder that ``owned`` does not
    claim (and ``write`` did not write) are carried over by hard link. Then one rename swaps the
    folders: the old one moves aside, the new one takes its path, the old one is removed. At every
    instant the path holds the old complete folder or the new one; a crash between the two
    renames leaves no folder and the old one aside (:func:`interrupted_save` says so). Files get
    the usual mode (``0666 & ~umask``), a new folder ``0777 & ~umask``, a replaced one its old
    mode. Leftovers of interrupted earlier writes (whose process is gone) are removed after the
    swap.
    """
    folder = os.path.realpath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot write a folder at {folder!r}: a file is there")
    parent = os.path.dirname(folder)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):  # makedirs would say "File exists"
        raise NotADirectoryError(20, "Not a directory", folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = _sibling(folder, _SAVING)
    try:
        write(tmp)
        file_mode = _usual_mode(directory=False)
        for fn in os.listdir(tmp):  # safetensors writes 0600; a saved model is for every user
            path = os.path.join(tmp, fn)
            if os.path.isfile(path) and not os.path.islink(path):
                os.chmod(path, file_mode)
        existed = os.path.isdir(folder)
        if existed:
            _carry_over(folder, tmp, owned)
        os.chmod(tmp, os.stat(folder).st_mode & 0o7777 if existed else _usual_mode(directory=True))
        _swap(tmp, folder, existed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_leftovers(folder)


def _swap(tmp: str, folder: str, existed: bool) -> None:
    """Rename ``tmp`` to ``folder``, moving an existing ``folder`` aside first."""
    if not existed:
        os.rename(tmp, folder)
        return
    cwd = os.getcwd()
    aside = _sibling(folder, _ASIDE)  # empty: rename(2) replaces an empty folder
    os.rename(folder, aside)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if cwd == folder or cwd.startswith(folder + os.sep):
        # The process' working folder moved aside with the old folder: follow the path.
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir(folder)
