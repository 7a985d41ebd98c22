"""A lock file that every user of the machine can take (stdlib only, so that
a test can run it with any Python as another user)."""

from __future__ import annotations

import os
from pathlib import Path


def open_shared_lock(path: Path) -> int:
    """Open the lock file *path*, making it if needed, so that any user can
    lock it with :func:`fcntl.flock`; return the file descriptor.

    Read access is enough for flock(), and opening without ``O_CREAT`` works on
    another user's file even in a sticky /tmp (``fs.protected_regular``).
    """
    while True:
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            pass
        except PermissionError:
            # Someone made it unreadable for us: lock alone, per user, rather
            # than fail (our runs may then clash with theirs on the ports).
            return os.open(
                path.with_name(f"{path.stem}-{os.getuid()}{path.suffix}"),
                os.O_RDONLY | os.O_CREAT,
                0o600,
            )
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
        except FileExistsError:
            continue  # Another run made it just now: open that one.
        os.fchmod(fd, 0o444)  # Readable for all, whatever our umask.
        return fd
