"""The local model's server process: llama.cpp (``xllamacpp``) serving one GGUF file.

    python server.py '{"model_path": ..., "alias": ..., "n_ctx": 4096, ...}'

Run by ``LocalProvider`` as a child process, by file path (it imports only
the standard library and ``xllamacpp``, never ``engine``: it starts in
~0.05 s and needs no ``sys.path`` set up). The contract with the parent:

- argv[1] is a JSON object of the settings: ``model_path``, ``alias`` (the
  model's name in the API), ``n_ctx``, ``n_predict``, ``threads``,
  ``dry_multiplier`` (see ``_params``);
- once the model is loaded and the OpenAI-compatible HTTP server listens on
  127.0.0.1 and a free port, one line ``ready <address>`` goes to stdout;
- a model llama.cpp cannot load: one line ``failed <reason>`` on stdout and
  exit code ``LOAD_FAILED``; llama.cpp's own words, if any, are on stderr;
- then it reads stdin until end of input and exits at once: the parent closes
  stdin to stop it, and its death closes stdin too, so no server outlives
  the process it serves (a portable way; ``PR_SET_PDEATHSIG`` is Linux only).

Why a process, not a thread: loading the model holds the GIL for its whole
duration (0.5-0.6 s for the demo model), so in-process nothing else runs
meanwhile; here it loads on another core while the parent imports. And a
crash of llama.cpp ends this process, not the bot.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import xllamacpp

LOAD_FAILED = 3


def _params(settings: dict[str, Any]) -> Any:
    params = xllamacpp.CommonParams()
    params.model.path = settings["model_path"]
    params.model_alias = {settings["alias"]}  # the server refuses to start without one
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # a free port; read back from listening_address
    params.n_parallel = 1
    params.n_ctx = settings["n_ctx"]
    # A hard cap on every answer (each request also sends max_tokens), and
    # llama.cpp's DRY sampler, which penalizes repeating what was already
    # written: small models otherwise loop on one sentence until a timeout.
    params.n_predict = settings["n_predict"]
    params.sampling.dry_multiplier = settings["dry_multiplier"]
    params.sampling.dry_penalty_last_n = -1  # the whole context, not the last 64 tokens
    params.cpuparams.n_threads = settings["threads"]
    params.cpuparams_batch.n_threads = settings["threads"]
    params.verbosity = -1  # llama.cpp's own logging is very chatty on stderr
    params.ui = False
    params.fit_params = _has_offload_device()
    return params


def _has_offload_device() -> bool:
    """Whether llama.cpp sees a device other than the CPU to place layers on.

    Its parameter fitting (on by default) dry-runs a load of the model and a
    context to measure them (0.4 s of CPU for the demo model, about 40% of
    its load), then, with no GPU, changes nothing. So it runs only where a
    device of another kind (GPU, integrated GPU, one we do not know) exists.
    """
    kinds = xllamacpp.ggml_backend_dev_type
    host = (kinds.GGML_BACKEND_DEVICE_TYPE_CPU, kinds.GGML_BACKEND_DEVICE_TYPE_ACCEL)
    return any(device["type"] not in host for device in xllamacpp.get_device_info())


def main(argv: list[str]) -> int:
    # Ctrl-C in a terminal chat stops an answer, not the model: the parent
    # decides when this process ends (it also starts it in a session of its own).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = json.loads(argv[1])
    try:
        server = xllamacpp.Server(_params(settings))
    except RuntimeError as exc:
        print(f"failed {exc}".replace("\n", " "), flush=True)
        return LOAD_FAILED
    print(f"ready {server.listening_address}", flush=True)
    # Nothing more for the parent to read: a later write must not block on a full pipe.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    while sys.stdin.buffer.read(65536):
        pass  # nobody writes; read() returns b"" at end of input
    # os._exit, not the server's C++ destructor: it joins the HTTP threads and
    # has been seen to hang at exit; the kernel frees all of it at once.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
