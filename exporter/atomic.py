"""Write a whole output folder or nothing: build it in a sibling temp folder, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from runtime.errors import QmoeError


class OutputExistsError(QmoeError, FileExistsError):
    pass


def output_path(target: str | Path) -> Path:
    """The absolute path atomic_dir writes: its parent resolved (`art/../art` or a symlinked parent
    name the real folder, whose sibling the temp folder is), the last name kept (a symlink there
    is replaced, not followed)."""
    p = Path(target)
    return p.resolve() if p.name in ("", "..") else p.absolute().parent.resolve() / p.name


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yields a temp folder next to `target`; on success it replaces `target`, on error it is
    removed, and so are the parent folders it had to create."""
    target = output_path(target)
    if os.path.lexists(target) and not force:
        raise OutputExistsError(f"{target}: already exists (use --force to replace it)")
    parent = target.parent
    created = [d for d in (parent, *parent.parents) if not d.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name[:64]}.", suffix=".partial", dir=parent))
    except OSError as e:
        _remove_empty(created)
        raise QmoeError(f"{parent}: cannot write there ({e.strerror})") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if os.path.lexists(target):  # a folder, a file or a symlink (dangling too): replaced, not followed
            old = target.with_name(f".{target.name}.old")
            _remove(old)
            target.rename(old)
            tmp.rename(target)
            _remove(old)
        else:
            tmp.rename(target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # say where
            raise QmoeError(f"{parent}: no space left on the device (writing {target.name})") from None
        raise


def _remove(path: Path) -> None:
    """rmtree for a folder; unlink for a file or a symlink (rmtree refuses symlinks)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    """Removes the folders this call created (deepest first) while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return
