"""Configuration: one TOML file plus secrets from the environment / ``.env``.

The TOML names environment variables (``api_key_env = "OPENAI_API_KEY"``);
the keys themselves live only in the environment and are resolved into
``SecretStr`` by ``Settings.secret``. ``load_settings`` raises ``ConfigError``
whose message names the file, the key and what is wrong.

Only the composition root (``adapters/wiring/``) reads this model; every
component receives plain values.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.errors import ConfigError
from engine.types import FooterMode, TrustLevel

# Environment variables (and storage options) whose names say they hold a secret.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)

ProviderKind = Literal[
    "openai", "gemini", "mistral", "glm", "anthropic",
    "claude_subscription", "openai_compatible", "local", "bedrock",
]


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise: reject them by name.
    model_config = ConfigDict(extra="forbid", frozen=True)


# The schemes a database URL may have, and the async driver each means.
_ASYNC_DRIVERS = {
    "postgres": "postgresql+asyncpg", "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite", "sqlite+aiosqlite": "sqlite+aiosqlite",
}


class StorageSettings(_Strict):
    data_dir: Path = Path("./data")
    database_url: str | None = None  # default: sqlite+aiosqlite in data_dir
    memory_uri: str | None = None  # default: data_dir/lancedb; "s3://bucket/prefix" allowed
    memory_storage_options: dict[str, str] = Field(default_factory=dict)
    memory_cache_mb: float = Field(default=512, ge=0)  # recall cache (docs/memory.md); 0: off
    redis_url: str | None = None
    # Scale-out: URLs that carry a password can come from the environment
    # instead (``database_url_env = "BOTERNITY_DATABASE_URL"``); the value wins
    # over ``database_url`` / ``redis_url``.
    database_url_env: str | None = None
    redis_url_env: str | None = None
    redis_namespace: str = "boternity"  # key prefix: several deployments, one Redis
    redis_lease_s: float = Field(default=30.0, gt=0)  # a dead worker's claim blocks this long
    max_file_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_bot_bytes: int = Field(default=1024 * 1024 * 1024, gt=0)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, url: str | None) -> str | None:
        """The URL with its async driver: ``postgres://`` and ``postgresql://``
        (what hosts hand out) mean asyncpg, ``sqlite://`` aiosqlite; any other
        driver is named with the fix."""
        if url is None:
            return None
        scheme, sep, rest = url.partition("://")
        if not sep:
            raise ValueError("not a URL: use postgresql+asyncpg://USER@HOST/DB or "
                             "sqlite+aiosqlite:///PATH")
        driver = _ASYNC_DRIVERS.get(scheme.lower())
        if driver is None:  # never echo the URL: it may hold a password
            raise ValueError(f"unsupported database '{scheme}://': use "
                             "postgresql+asyncpg://USER@HOST/DB (postgres:// means the same) "
                             "or sqlite+aiosqlite:///PATH")
        return f"{driver}://{rest}"

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'boternity.db'}"

    def resolved_memory_uri(self) -> str:
        return self.memory_uri or str(self.data_dir / "lancedb")


class ChainSettings(_Strict):
    fail_max: int = Field(default=3, ge=1)
    reset_timeout_s: float = Field(default=30, gt=0)


class ProviderSettings(_Strict):
    kind: ProviderKind
    model: str = ""
    api_key_env: str | None = None
    base_url: str | None = None
    timeout_s: float = Field(default=30, gt=0)
    first_token_timeout_s: float = Field(default=15, gt=0)
    idle_timeout_s: float = Field(default=15, gt=0)
    fail_max: int | None = Field(default=None, ge=1)
    reset_timeout_s: float | None = Field(default=None, gt=0)
    temperature: float | None = None
    # capabilities overrides (None = the preset's default)
    vision: bool | None = None
    tools: bool | None = None
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    # prices in USD per million tokens
    price_input_per_mtok: float = Field(default=0.0, ge=0)
    price_output_per_mtok: float = Field(default=0.0, ge=0)
    # speech to text (voice messages) through this provider's /audio/transcriptions
    transcription_model: str | None = None
    # local (llama.cpp) only
    model_path: Path | None = None
    threads: int = Field(default=1, ge=1)
    # bedrock only
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None

    @model_validator(mode="after")
    def _kind_rules(self) -> ProviderSettings:
        if self.kind == "openai_compatible" and not self.base_url:
            raise ValueError("base_url is required for kind = 'openai_compatible'")
        if self.kind not in ("local",) and not self.model:
            raise ValueError(f"model is required for kind = '{self.kind}'")
        if self.transcription_model and self.kind in ("local", "bedrock"):
            raise ValueError(f"transcription_model: kind = '{self.kind}' offers no speech to text")
        return self


class MemorySettings(_Strict):
    enabled: bool = True
    top_k: int = Field(default=5, ge=0, le=50)
    min_score: float = Field(default=0.3, ge=-1, le=1)
    extract: bool = True
    extract_with_local: bool = False  # the demo model's "facts" are unreliable
    # groups also recall what was learned in DMs and other groups (trusted groups only)
    recall_across_chats: bool = False
    # One: onnxruntime's second intra-op thread spins while it waits, which on a
    # busy host costs ~2x the CPU per text for no faster answer (docs/benchmarks.md).
    embedding_threads: int = Field(default=1, ge=1)


class PlatformSettings(_Strict):
    api_base_url: str | None = None
    admins: list[str] = Field(default_factory=list)
    # when to answer in groups: only when addressed, or every message
    group_reply: Literal["mention", "always"] = "mention"
    channels: dict[str, Literal["mention", "always", "never"]] = Field(default_factory=dict)
    reply_to_bots: bool = False
    max_bot_turns: int = Field(default=3, ge=0)

    @field_validator("admins", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        # Telegram and Discord ids are numbers: `admins = [12345]` means "12345".
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v
                    for v in value]
        return value


class TelegramSettings(PlatformSettings):
    token_env: str
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None
    webhook_secret_env: str | None = None
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = 8443


class SlackSettings(PlatformSettings):
    bot_token_env: str
    app_token_env: str | None = None
    signing_secret_env: str | None = None
    mode: Literal["socket", "http"] = "socket"
    http_host: str = "127.0.0.1"  # put a TLS reverse proxy in front; "0.0.0.0" to expose
    http_port: int = Field(default=3000, ge=0, le=65535)
    http_path: str = "/slack/events"
    # workspace admins/owners (users.info) of the bot's workspace may READ its Slack
    # data with the admin commands (scoped, read-only; docs/configuration.md)
    trust_workspace_admins: bool = False


class DiscordSettings(PlatformSettings):
    token_env: str
    # Sharding across workers: each worker lists its own shard ids of shard_count.
    shard_ids: list[int] | None = None
    shard_count: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _shards(self) -> DiscordSettings:
        if self.shard_ids is not None:
            if self.shard_count is None:
                raise ValueError("shard_ids needs shard_count")
            bad = [i for i in self.shard_ids if not 0 <= i < self.shard_count]
            if bad or not self.shard_ids:
                raise ValueError(f"shard_ids must be 0..{self.shard_count - 1} (got "
                                 f"{self.shard_ids})")
        return self
    gateway_url: str | None = None  # with api_base_url (".../api/v10"): proxies and tests
    # server Administrators may READ their server's data with the admin commands
    # (scoped, read-only; docs/configuration.md); off: anyone can make a server
    trust_guild_admins: bool = False


class BotSettings(_Strict):
    persona: str = "You are a helpful assistant."
    chain: list[str] = Field(min_length=1)
    footer: FooterMode = "on_failover"
    history_messages: int = Field(default=30, ge=0)
    max_output_tokens: int | None = Field(default=None, gt=0)  # None: each provider's own
    memory: MemorySettings = Field(default_factory=MemorySettings)
    trust_level: TrustLevel = "public"  # default level of what this bot publishes
    trust_groups: list[str] = Field(default_factory=list)
    budget_usd_per_day: float | None = Field(default=None, ge=0)
    user_budget_usd_per_day: float | None = Field(default=None, ge=0)
    # retention (days; None = keep): history, files and recall log / memories
    history_days: int | None = Field(default=None, ge=1)
    memory_days: int | None = Field(default=None, ge=1)
    telegram: TelegramSettings | None = None
    slack: SlackSettings | None = None
    discord: DiscordSettings | None = None


class LogSettings(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, alias="json")


class HttpSettings(_Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9108


class AdminSettings(_Strict):
    """The admin API and web console, served by ``[http]`` (off without a token)."""

    token_env: str = "BOTERNITY_ADMIN_TOKEN"  # noqa: S105  (a variable name, not a secret)
    session_ttl_s: float = Field(default=12 * 3600, gt=0)  # console login lifetime


class Settings(_Strict):
    """The whole configuration. ``env`` holds the environment used for secrets."""

    storage: StorageSettings = Field(default_factory=StorageSettings)
    chain: ChainSettings = Field(default_factory=ChainSettings)
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    bots: dict[str, BotSettings] = Field(default_factory=dict)
    log: LogSettings = Field(default_factory=LogSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    source: str = Field(default="<memory>", exclude=True)
    env: dict[str, str] = Field(default_factory=dict, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _urls_from_env(cls, data: Any) -> Any:
        # database_url_env / redis_url_env: resolve before validation, so every
        # reader of ``storage`` sees one URL.
        if not isinstance(data, dict) or not isinstance(data.get("storage"), dict):
            return data
        storage, env = dict(data["storage"]), data.get("env") or {}
        for key in ("database_url", "redis_url"):
            name = storage.get(f"{key}_env")
            if isinstance(name, str) and env.get(name):
                storage[key] = env[name]
        return {**data, "storage": storage}

    @model_validator(mode="after")
    def _chains_exist(self) -> Settings:
        for bot_name, bot in self.bots.items():
            for provider in bot.chain:
                if provider not in self.providers:
                    known = ", ".join(sorted(self.providers)) or "none"
                    raise ValueError(
                        f"bots.{bot_name}.chain: unknown provider '{provider}' "
                        f"(configured: {known})"
                    )
        return self

    def secret(self, env_name: str | None, *, key: str) -> SecretStr | None:
        """Resolve ``env_name`` to a secret, or None when unset.

        ``key`` is the config key that named it, for the error message.
        """
        if not env_name:
            return None
        value = self.env.get(env_name)
        if value is None or value == "":
            return None
        return SecretStr(value)

    def require_secret(self, env_name: str | None, *, key: str) -> SecretStr:
        value = self.secret(env_name, key=key)
        if value is None:
            raise ConfigError(
                f"{self.source}: {key}: environment variable "
                f"'{env_name or '(not set)'}' is empty or unset (see .env.example)"
            )
        return value


def _format_validation(path: str, err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        msg = str(item["msg"]).removeprefix("Value error, ")
        # Whole-file validators name the key in their message themselves.
        lines.append(f"{path}: {key}: {msg}" if key else f"{path}: {msg}")
    return "\n".join(lines)


def load_settings(
    path: str | Path = "boternity.toml",
    *,
    environ: dict[str, str] | None = None,
    dotenv: str | Path | None = ".env",
) -> Settings:
    """Read the TOML file and the environment (``.env`` first, real env wins).

    Relative ``data_dir`` and ``model_path`` resolve against the current
    directory, as a user typing the command would expect.
    """
    path = Path(path)
    env: dict[str, str] = {}
    if dotenv is not None and Path(dotenv).is_file():
        env.update(_read_dotenv(Path(dotenv)))
    env.update(os.environ if environ is None else environ)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found (copy deploy/boternity.example.toml or pass --config)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        return Settings.model_validate({**raw, "source": str(path), "env": env})
    except ValidationError as exc:
        raise ConfigError(_format_validation(str(path), exc)) from None


def _read_dotenv(path: Path) -> dict[str, str]:
    """The variables of a ``.env`` file; ConfigError naming the file and line when malformed."""
    try:
        with path.open(encoding="utf-8") as stream:
            bad = next((b.original.line for b in parse_stream(stream) if b.error), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if bad is not None:
        # python-dotenv would only log a warning and skip the line (a missing secret later).
        raise ConfigError(f"{path}:{bad}: not a KEY=value line (.env syntax)")
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def secret_values(settings: Settings) -> set[str]:
    """Every secret the configuration can reach: variables named by ``*_env``
    keys, variables whose names say key/token/secret/password, passwords in
    the storage URLs and secret-looking ``memory_storage_options``."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if isinstance(key, str) and key.endswith("_env") and isinstance(value, str):
                    found.add(settings.env.get(value, ""))
                walk(value)
        elif isinstance(node, list | tuple):
            for item in node:
                walk(item)

    walk(settings.model_dump())
    found.update(v for k, v in settings.env.items() if _SECRET_NAME.search(k))
    storage = settings.storage
    for url in (storage.database_url, storage.redis_url, storage.memory_uri):
        if url and (match := re.search(r"://[^/\s:@]*:([^/\s@]+)@", url)):
            found.add(match.group(1))
    found.update(v for k, v in storage.memory_storage_options.items() if _SECRET_NAME.search(k))
    found.discard("")
    return found
