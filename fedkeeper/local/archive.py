"""Unpacking a function's or action's zip on the local platforms, bounded:
member paths stay inside the destination (no absolute paths, no `..`, no
links), and the member count and the total size the archive declares are
limited before anything is written (a few megabytes of deflate can inflate
to gigabytes; zipfile never writes more than a member declares); then the
Python in it compiled once, so that each process that loads the code reads
bytecode instead of compiling every module again (those processes run with
PYTHONDONTWRITEBYTECODE, and a new one starts at every cold start)."""
from __future__ import annotations

import io
import logging
import stat
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

from .supervisor import minimal_env

# What the largest platform accepts unpacked (Cloud Functions: 500 MB
# uncompressed source; OpenWhisk actions are smaller), with room to spare.
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
MAX_MEMBERS = 20000
# Compiling is an optimisation: past this the code is left as source, and
# each process compiles what it imports, as it did before.
COMPILE_TIMEOUT_S = 120.0

log = logging.getLogger("fedkeeper.local")


class ArchiveError(ValueError):
    """The archive is not a zip this platform would deploy."""


def extract_zip(data: bytes, dest: Path, *, max_bytes: int = MAX_UNPACKED_BYTES,
                max_members: int = MAX_MEMBERS) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise ArchiveError(f"the zip has {len(infos)} members (at most {max_members})")
            total = 0
            for info in infos:
                p = PurePosixPath(info.filename)
                if p.is_absolute() or ".." in p.parts or "\\" in info.filename:
                    raise ArchiveError(f"the zip has an unsafe member path: {info.filename!r}")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ArchiveError(f"the zip has a symbolic link: {info.filename!r}")
                total += info.file_size
            if total > max_bytes:
                raise ArchiveError(f"the zip unpacks to {total} bytes (at most {max_bytes})")
            zf.extractall(dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise ArchiveError(f"not a valid zip archive: {exc}") from None


def compile_python(dest: Path) -> None:
    """Write bytecode next to every Python module under `dest`.

    Checked-hash bytecode (PEP 552): it stays valid for exactly the source
    it was compiled from, whatever the files' modification times. It is
    compiled by a separate interpreter, the one the local function
    processes run (so the bytecode is theirs), in isolated mode and with the
    minimal environment they get: the code is untrusted, and compiling it
    runs none of it but must not be able to take the platform's process
    down. A module that does not compile is left to fail where it is
    imported, with the error the action's author should see."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-m", "compileall", "-q", "--invalidation-mode", "checked-hash", str(dest)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=minimal_env(), timeout=COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("compiling %s: %s", dest, exc)
        return
    if done.returncode != 0:
        log.debug("compiling %s: some modules did not compile (rc %s)", dest, done.returncode)
