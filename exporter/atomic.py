"""Write a whole output folder or nothing: build it in a sibling temp folder, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from runtime.errors import QmoeError


class OutputExistsError(QmoeError, FileExistsError):
    pass


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yields a temp folder next to `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target).absolute()
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists (use --force to replace it)")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise QmoeError(f"{parent}: cannot write there ({e.strerror})") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
