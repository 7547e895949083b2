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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default checkpoint (`qmoe tiny`), real tokenizer included."""
    from exporter.tiny import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ck", tiny_config())


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported for ONNX Runtime (float32)."""
    from exporter.export import export

    return export(tiny_checkpoint, tmp_path_factory.mktemp("tiny_art") / "art")
