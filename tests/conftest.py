"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the real Qwen2 tokenizer files (built once per session)."""
    from exporter.qwen_tokenizer import write_tokenizer_files

    folder = tmp_path_factory.mktemp("qwen2_tokenizer")
    write_tokenizer_files(folder)
    return folder
