"""Reading a file a user names: only regular files, and never more bytes than the reader can use.

Every reader of a user's file goes through here (prompt files, styles, manifests, pictures, PNG text,
checkpoints, LoRA and embedding files), so a FIFO, a device such as /dev/zero, a socket or a folder is one
line instead of a hang or a read without end. The file is opened with O_NONBLOCK (opening a FIFO for
reading would otherwise wait for a writer) and checked with fstat on the open descriptor, so a name swapped
for a FIFO between a check and the open is caught as well.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from ldm.errors import SDError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def open_regular(path: str | os.PathLike, what: str = "file") -> io.BufferedReader:
    """`path` open for binary reading; SDError (one line naming `what` and the path) when it is missing,
    unreadable, or not a regular file."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SDError(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise SDError(f"{p} is a folder, not {_a(what)}") from None
    except OSError as exc:
        raise SDError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SDError(f"{p} is {kind_of(mode)}, not {_a(what)}: sd reads only regular files")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def regular_size(path: str | os.PathLike, what: str = "file") -> int:
    """The size of the regular file `path` (SDError as open_regular says otherwise), for readers that hand
    the path on to a library (safetensors, torch.load, zipfile) once it is known to be a plain file."""
    with open_regular(path, what) as f:
        return os.fstat(f.fileno()).st_size


def is_regular(path: str | os.PathLike) -> bool:
    """True when `path` names a regular file (following links); False when it is missing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_capped(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them: a larger file is one SDError line
    before anything is read (and a file that grows while read is stopped at the bound)."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise SDError(f"{what} {path} is {size:,} bytes, more than the {max_bytes:,} sd reads from such a file")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise SDError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise SDError(f"{what} {path} grew past the {max_bytes:,} bytes sd reads from such a file")
    return data


def read_text_capped(path: str | os.PathLike, max_bytes: int, what: str = "file", encoding: str = "utf-8") -> str:
    """The text of the regular file `path` (at most `max_bytes` bytes); SDError when it is not `encoding`."""
    data = read_capped(path, max_bytes, what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise SDError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def file_stamp(path: str | os.PathLike) -> tuple[str, int, int]:
    """(real path, size, mtime in ns): what a cache keyed by a file is keyed by, so a changed file misses it."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns


def model_files(folder, suffixes: tuple[str, ...], max_files: int) -> dict[str, Path]:
    """{name: file} of the files of `folder` and its subfolders whose names end in `suffixes` (the first in
    sorted order where two share a stem; at most `max_files`): regular files whose real place is inside the
    folder, so neither a link nor a FIFO leads a read elsewhere or blocks it. {} without the folder."""
    if folder is None or not Path(folder).is_dir():
        return {}
    root = Path(folder).resolve()
    found: dict[str, Path] = {}
    for where, dirs, files in os.walk(root):
        dirs.sort()
        for file in sorted(files):
            path = Path(where) / file
            if path.suffix not in suffixes or path.stem in found:
                continue
            try:
                real = path.resolve()
                if real.is_relative_to(root) and stat.S_ISREG(real.stat().st_mode):
                    found[path.stem] = real
            except (OSError, RuntimeError):  # a dangling or looping link
                continue
            if len(found) >= max_files:
                return found
    return found
