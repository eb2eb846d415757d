"""Docker HEALTHCHECK: is the worker's ``/healthz`` answering?

Reads the mounted config (``BOTERNITY_CONFIG``, default
``/etc/boternity/boternity.toml``). With ``[http] enabled = true`` it asks
``/healthz`` on the configured port and exits 1 when nothing answers. Without
``[http]`` there is no endpoint to ask, so it exits 0 and says so: the
container is then as healthy as its process is alive (Docker restarts it on
exit), rather than marked unhealthy for a config without an ops server.
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.request

path = os.environ.get("BOTERNITY_CONFIG", "/etc/boternity/boternity.toml")
try:
    with open(path, "rb") as f:
        http = tomllib.load(f).get("http", {})
except (OSError, tomllib.TOMLDecodeError) as exc:
    sys.exit(f"healthcheck: cannot read {path}: {exc}")
if not http.get("enabled", False):
    print(f"healthcheck: [http] is not enabled in {path}; only the process is watched")
    sys.exit(0)
try:
    urllib.request.urlopen(f"http://127.0.0.1:{http.get('port', 9108)}/healthz", timeout=4)
except OSError as exc:
    sys.exit(f"healthcheck: /healthz did not answer: {exc}")
