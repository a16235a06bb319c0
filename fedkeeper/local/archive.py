"""Unpacking a function's or action's zip on the local platforms, bounded:
member paths stay inside the destination (no absolute paths, no `..`, no
links), and the member count and the total size the archive declares are
limited before anything is written (a few megabytes of deflate can inflate
to gigabytes; zipfile never writes more than a member declares)."""
from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path, PurePosixPath

# What the largest platform accepts unpacked (Cloud Functions: 500 MB
# uncompressed source; OpenWhisk actions are smaller), with room to spare.
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
MAX_MEMBERS = 20000


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
