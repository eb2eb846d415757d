"""The ``local`` kind: the real demo GGUF through the real llama.cpp server in a child process.

Short completions only (temperature 0, a few tokens); assertions are on
structure (text, usage, lifecycle, processes), never on wording or time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx2
import pytest

from engine.errors import ConfigError, Unavailable
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.local import DEMO_LABEL, LocalProvider, demo_model_path
from engine.providers.registry import ProviderConfig, build_provider
from engine.types import CompletionRequest, Message

ROOT = Path(__file__).resolve().parent.parent
HELLO = CompletionRequest((Message("user", "Say hello."),), max_tokens=4)


async def _text(provider: LocalProvider) -> str:
    return "".join([chunk.text async for chunk in provider.stream(HELLO)])


def _parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _gone(pid: int) -> bool:
    """Whether ``pid`` ends within 30 s (a bound, not a timing assertion)."""
    for _ in range(300):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.1)
    return False


async def test_demo_model_answers_through_the_chain_and_stops_cleanly() -> None:
    provider = build_provider(ProviderConfig(name="demo", kind="local", temperature=0.0))
    assert isinstance(provider, LocalProvider)
    assert provider.label == DEMO_LABEL and provider.is_demo
    assert provider.base_url is None  # lazy: nothing started yet
    # CPU-bound: reading a long prompt comes before the first token, so the
    # preset raises the configured (default 30 s / 15 s) limits to its floors.
    assert (provider.timeout_s, provider.first_token_timeout_s) == (120.0, 60.0)
    request = CompletionRequest(
        (Message("system", "You are a helpful assistant."),
         Message("user", "Say hello in one short sentence.")),
        max_tokens=16,
    )
    async with provider:
        run = FallbackChain([provider], Breakers()).run(request)
        texts = [chunk.text async for chunk in run if chunk.text]
        base_url = provider.base_url
    assert base_url is not None and base_url.startswith("http://127.0.0.1:")
    assert "".join(texts).strip()
    assert run.served_by == "demo" and run.failures == ()
    assert run.usage.estimated is False  # llama.cpp reports usage
    assert 0 < run.usage.completion_tokens <= 16 and run.usage.prompt_tokens > 0
    with pytest.raises(httpx2.ConnectError):  # the server is gone
        async with httpx2.AsyncClient(timeout=2) as http:
            await http.get(base_url.removesuffix("/v1") + "/health")


def test_demo_model_file_is_found_via_its_package() -> None:
    path = demo_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 1_000_000


def test_bad_model_path_is_a_clear_config_error(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        LocalProvider(name="x", model_path=not_gguf)
    with pytest.raises(ConfigError, match="cannot read"):
        LocalProvider(name="x", model_path=tmp_path / "missing.gguf")
    own = LocalProvider(name="x", model_path=demo_model_path(), model="mine")
    assert own.label != DEMO_LABEL and own.model == "mine"  # any GGUF path, no demo label


def test_no_parameter_fitting_without_a_gpu() -> None:
    # llama.cpp's fitting dry-runs a load to place layers on GPUs; with none it
    # changes nothing, so a CPU-only machine (this one, CI) skips it.
    import xllamacpp

    from engine.providers.local import server

    kinds = xllamacpp.ggml_backend_dev_type
    devices = {device["type"] for device in xllamacpp.get_device_info()}
    if not devices <= {kinds.GGML_BACKEND_DEVICE_TYPE_CPU, kinds.GGML_BACKEND_DEVICE_TYPE_ACCEL}:
        pytest.skip("a GPU is present: llama.cpp fits the parameters to it")
    settings = {"model_path": str(demo_model_path()), "alias": "demo", "n_ctx": 4096,
                "n_predict": 16, "threads": 1, "dry_multiplier": 0.8}
    assert server._params(settings).fit_params is False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
async def test_the_server_is_a_child_process_that_ends_with_the_provider() -> None:
    provider = LocalProvider(name="demo", temperature=0.0)
    async with provider:
        await provider.start()  # returns once the process runs, before the model loads
        pid = provider.pid
        assert pid is not None and pid != os.getpid() and _parent_of(pid) == os.getpid()
        # Its own session: a Ctrl-C at the terminal (SIGINT to our group) is not for it.
        assert os.getsid(pid) != os.getsid(0)
        assert await _text(provider)
        assert provider.pid == pid  # the same server answers: started once
    assert provider.pid is None and provider.base_url is None
    assert not _alive(pid)  # stopped and reaped by aclose


async def test_a_killed_server_fails_the_next_stream_clearly_then_restarts() -> None:
    async with LocalProvider(name="demo", temperature=0.0) as provider:
        assert await _text(provider)
        first = provider.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # what a llama.cpp crash or the OOM killer does
        assert await _gone(first)
        with pytest.raises(Unavailable, match="local model stopped unexpectedly") as failed:
            await _text(provider)
        assert "signal 9" in failed.value.detail
        assert provider.pid is None  # forgotten: the next stream starts a new one
        assert await _text(provider)
        assert provider.pid not in (None, first)


async def test_the_server_ends_when_its_parent_dies() -> None:
    # A parent killed outright (no aclose, no atexit) closes the child's stdin.
    script = (
        "import asyncio, os, signal\n"
        "from engine.providers.local import LocalProvider\n"
        "async def main():\n"
        "    provider = LocalProvider(name='demo')\n"
        "    await provider.serving()\n"
        "    print(provider.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await parent.communicate()
    assert parent.returncode == -signal.SIGKILL
    assert await _gone(int(out))


async def test_a_gguf_that_llama_cpp_cannot_load_is_unavailable_with_its_words(
        tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)  # the magic passes check_gguf; the rest is junk
    provider = LocalProvider(name="mine", model_path=broken)
    async with provider:
        with pytest.raises(Unavailable, match="local model failed to load") as failed:
            await _text(provider)
        assert failed.value.detail  # what llama.cpp or the child said, for the log
        assert provider.pid is None  # nothing left running; the next stream tries again


def _local_first_config(tmp_path: Path, *,
                        persona: str = "You are a helpful assistant.") -> Path:
    """A config whose bot ``demo`` has the local model first in its chain."""
    config = tmp_path / "boternity.toml"
    line = f'persona = "{persona}"\n' if persona else ""
    config.write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"

[providers.local]
kind = "local"

[bots.demo]
{line}chain = ["local"]
""")
    return config


async def test_a_chat_whose_chain_starts_local_starts_the_model_in_build_app(
        tmp_path: Path) -> None:
    # Started before the database opens, so it loads while the chat starts;
    # without chat_bot it stays lazy (a last-resort model costs nothing).
    from adapters.wiring.build import build_app
    from adapters.wiring.settings import load_settings

    config = _local_first_config(tmp_path)
    settings = load_settings(config, dotenv=None)
    async with build_app(settings, lazy=True, serve=False) as app:
        provider = app.providers["local"]
        assert isinstance(provider, LocalProvider) and provider.pid is None
    async with build_app(settings, lazy=True, serve=False, chat_bot="demo") as app:
        provider = app.providers["local"]
        assert isinstance(provider, LocalProvider)
        pid = provider.pid
        assert pid is not None and _alive(pid)
    assert not _alive(pid)


async def test_the_demo_chat_answers_without_the_openai_sdk(tmp_path: Path) -> None:
    # The demo's path: the embedded config (no ./boternity.toml), a line piped in.
    # Its model is served by our own child, talked to on httpx2 alone: the
    # SDK's import (0.5-1 s of CPU) is not paid before the first answer; nor
    # SQLAlchemy's PostgreSQL dialect (0.1-0.2 s) on a SQLite database.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LANCEDB_LOG")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "importtime", "-m", "adapters.cli", "chat", cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(b"Say hello.\n"), timeout=300)
    lines = err.decode().splitlines()
    modules = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert proc.returncode == 0, "\n".join(x for x in lines if not x.startswith("import time:"))
    assert DEMO_LABEL in out.decode() and out.decode().split(DEMO_LABEL)[0].strip(" \n-")
    tops = {m.split(".")[0] for m in modules}
    assert "httpx2" in tops and "openai" not in tops
    assert "sqlalchemy.dialects.sqlite" in modules
    assert "sqlalchemy.dialects.postgresql" not in modules


# Which children this process has when SQLAlchemy is first imported.
_ORDER = """
import asyncio, glob, os, sys
from pathlib import Path
seen = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "sqlalchemy" and name not in seen:
            seen[name] = children()
        return None
def children():
    # Every process whose parent is this one (/proc/PID/stat's 4th field; the
    # task/*/children files need a kernel option some machines lack).
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == os.getpid():
            found.append(stat.split("/")[2])
    return found
sys.meta_path.insert(0, Watch())
from adapters.wiring.build import build_app
from adapters.wiring.settings import load_settings
assert "sqlalchemy" not in sys.modules  # importing the wiring does not import storage
async def main():
    settings = load_settings(sys.argv[1], dotenv=None)
    async with build_app(settings, lazy=True, serve=False, chat_bot="demo") as app:
        print(app.providers["local"].pid, " ".join(seen["sqlalchemy"]))
asyncio.run(main())
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_a_local_first_chat_starts_the_model_before_importing_storage(
        tmp_path: Path) -> None:
    # The model loads in its process while this one imports SQLAlchemy and the
    # memory wiring (0.4-0.9 s), not after: the server is a child already when
    # sqlalchemy is first looked up. A fresh interpreter: nothing imported yet.
    config = _local_first_config(tmp_path, persona="")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ORDER, str(config), cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode == 0, err.decode()
    pid, *children = out.decode().split()
    assert pid in children
