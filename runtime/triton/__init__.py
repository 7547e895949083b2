"""Serve a qmoe artifact with NVIDIA Triton Inference Server (python backend, decoupled streaming).

    artifact -> write_repository -> <repo>/<name>/{config.pbtxt, 1/model.py} -> tritonserver

protocol.py is the request/response contract, repository.py writes the model repository, model.py
is the python-backend model copied into it, server.py finds and starts the nvidia-pytriton wheel's
tritonserver. Needs the triton extra (tritonclient) only to write config.pbtxt.
"""

from __future__ import annotations

from .repository import ModelSpec, RepositoryError, current_python_env, read_config, write_repository

__all__ = ["ModelSpec", "RepositoryError", "current_python_env", "read_config", "write_repository"]
