"""Outputs that are complete or absent: write beside the destination, then swap it in.

Every writer that makes a directory (import, pairs, export, eval reports, latent caches) builds it
in a hidden staging dir next to the destination, `.NAME.partial-HOST-PID-XXXX`, and renames it into
place at the end. Replacing an existing destination renames the old one aside
(`.NAME.old-HOST-PID`) first and deletes it only after the new one is in place, so a kill at any
point leaves either the old output or the new one under NAME:

- killed while staging: NAME is untouched; the staging dir is a leftover;
- killed between the two renames: NAME is missing and `.NAME.old-*` holds the previous output;
  the next writer of NAME renames it back (with a WARNING) before it starts.

Small files are written the same way (`write_text`, `write_bytes`). `sha256_file` is the one file digest
that checkpoints, latent caches and export manifests record.

Leftovers are removed by the next writer of the same NAME when the process that made them is gone
(same host, pid no longer running): a staging dir of a live process, or of another host on a
shared filesystem, is never touched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def _owner_gone(tag: str) -> bool:
    """True when `tag` ("HOST-PID...") names a process of this host that no longer runs."""
    m = re.match(rf"{re.escape(_HOST)}-(\d+)(?:-|$)", tag)
    if not m:
        return False  # another host's (or an older naming's) leftover: not ours to judge
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def recover(dest: Path) -> None:
    """Put back a previous output a killed swap left aside, and remove dead writers' leftovers."""
    dest = Path(dest)
    parent = dest.parent
    if not parent.is_dir():
        return
    old_prefix, part_prefix = f".{dest.name}.old-", f".{dest.name}.partial-"
    for entry in sorted(parent.iterdir()):
        name = entry.name
        if name.startswith(old_prefix) and _owner_gone(name[len(old_prefix):]):
            if not dest.exists():
                log.warning("%s: restoring the previous output from %s (a replace was interrupted)", dest, entry)
                os.replace(entry, dest)
            else:
                shutil.rmtree(entry, ignore_errors=True)
        elif name.startswith(part_prefix) and _owner_gone(name[len(part_prefix):]):
            log.info("removing %s, left by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def staging_dir(dest: Path) -> Path:
    """A fresh hidden dir beside `dest` to build it in (after `recover(dest)`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{_HOST}-{os.getpid()}-", dir=dest.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output gets the usual permissions
    return tmp


def staging_file(dest: Path) -> Path:
    """A hidden path beside file `dest` to write it to before `os.replace(tmp, dest)`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.partial-{_HOST}-{os.getpid()}-", dir=dest.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would have given it
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def swap_in(tmp: Path, dest: Path) -> None:
    """Make the staged `tmp` the content of `dest`, replacing what was there (see module doc)."""
    tmp, dest = Path(tmp), Path(dest)
    if not dest.exists() and not dest.is_symlink():
        os.replace(tmp, dest)
        return
    aside = dest.parent / f".{dest.name}.old-{_HOST}-{os.getpid()}"
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(dest, aside)
    os.replace(tmp, dest)
    shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)


def write_bytes(dest: Path, data: bytes) -> None:
    """Write a small file whole: a reader sees the old content or the new, never a torn one."""
    tmp = staging_file(dest)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(dest: Path, text: str) -> None:
    write_bytes(dest, text.encode())


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (the digest every lftk record uses)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
