"""The ``local`` provider: a GGUF model served by llama.cpp in a child process.

``provider.py`` is the ``Provider`` (``LocalProvider``) and what it needs to
find and check a model; ``server.py`` is the child process's program, run by
path so it imports nothing of Boternity. See ``provider.py`` for the contract.
"""

from engine.providers.local.provider import (
    DEMO_LABEL,
    LocalProvider,
    check_gguf,
    demo_model_path,
)

__all__ = ["DEMO_LABEL", "LocalProvider", "check_gguf", "demo_model_path"]
