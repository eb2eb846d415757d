"""Slack adapter: slack-bolt ``AsyncApp`` over Socket Mode (default) or HTTP Events.

Contract:
- Sending and editing go through ``SlackSender`` (``slack_sender.py``); a chat
  id is ``"<channel>"`` or ``"<channel>/<thread_ts>"`` for a thread.
- ``SlackAdapter`` (an async context manager, one per bot) connects, turns
  ``message`` / ``app_mention`` events into ``IncomingMessage``s, and hands them
  to the shared handler; slash commands are acked at once (Slack wants an
  answer within 3 s) and answered through ``response_url`` from a task.
- The signing secret is checked by bolt (HTTP mode), never by hand.
- Slack retries an event it thinks was not acked (``X-Slack-Retry-Num`` /
  ``retry_attempt``), and sends a mention both as ``message`` and as
  ``app_mention``: every message is claimed once in a ``Dedupe`` keyed by
  team, channel and ts before it is handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp import web
from pydantic import SecretStr
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.chat.commands import Caller, Commands
from adapters.chat.dedupe import Dedupe, MemoryDedupe
from adapters.chat.gate import Facts, Gate, GateConfig
from adapters.chat.handler import Handler, Inflight, PendingFile
from adapters.chat.outbound import (
    SLACK,
    DeliveryError,
    Limits,
    MessageSender,
    Outbound,
    RateBudget,
)
from adapters.chat.render import to_slack
from adapters.platforms.slack_sender import SlackSender
from engine.errors import ConfigError
from engine.memory.scope import user_key
from engine.ports import FileStore, Replier
from engine.types import IncomingMessage

log = logging.getLogger(__name__)


# --- the adapter --------------------------------------------------------------

ANSWERED_SUBTYPES = {None, "file_share", "thread_broadcast", "bot_message"}


@dataclass(frozen=True)
class SlackConfig:
    """Plain values for one bot's Slack connection (built by the composition root)."""

    bot: str
    bot_token: SecretStr
    app_token: SecretStr | None = None
    signing_secret: SecretStr | None = None
    mode: Literal["socket", "http"] = "socket"
    http_host: str = "127.0.0.1"
    http_port: int = 3000
    http_path: str = "/slack/events"
    api_base_url: str | None = None
    # Workspace admins/owners of the bot's own workspace may READ its Slack data
    # (adapters/chat/commands.py: scoped, read-only). Off: anyone who is made a
    # workspace admin would otherwise read what people told the bot.
    trust_workspace_admins: bool = False
    gate: GateConfig = field(default_factory=GateConfig)
    limits: Limits = SLACK
    request_timeout_s: int = 30  # per Web API call

    def __post_init__(self) -> None:
        if self.mode == "socket" and self.app_token is None:
            raise ConfigError(f"bots.{self.bot}.slack: Socket Mode needs app_token_env "
                              f"(an xapp- token), or set mode = 'http'")
        if self.mode == "http" and self.signing_secret is None:
            raise ConfigError(f"bots.{self.bot}.slack: HTTP mode needs signing_secret_env")


class SlackAdapter:
    """One bot in one Slack workspace; ``async with`` it, or ``await run()``.

    ``replier`` is the bot's reply pipeline, ``files`` its file storage,
    ``commands`` the shared admin commands, ``dedupe`` the event claim
    (in-process by default; Redis when workers share the load).
    """

    def __init__(
        self,
        config: SlackConfig,
        *,
        replier: Replier,
        files: FileStore | None = None,
        commands: Commands | None = None,
        dedupe: Dedupe | None = None,
        budget: RateBudget | None = None,
        semaphore: asyncio.Semaphore | None = None,
        wrap_sender: Callable[[MessageSender], MessageSender] | None = None,
        inflight: Inflight | None = None,
    ) -> None:
        self.config = config
        self.replier = replier
        self.inflight = inflight  # replies in flight, shared by workers (scale-out)
        self.wrap_sender = wrap_sender  # e.g. metrics around every send/edit
        self.files = files
        self.commands = commands
        self.dedupe: Dedupe = dedupe or MemoryDedupe()
        self.budget = budget
        self.semaphore = semaphore
        self.gate = Gate(config.gate)
        self.bot_user_id = ""
        self.bot_id = ""
        self.team = ""
        self.http_port = config.http_port  # the bound port once started (0 picks one)
        self._stack = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task[None]] = set()
        self._socket: AsyncSocketModeHandler | None = None
        self._serving = False

    # lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> SlackAdapter:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def run(self) -> None:
        """Serve until cancelled (``boternity run``)."""
        async with self:
            await asyncio.Event().wait()

    async def _start(self) -> None:
        config = self.config
        base = config.api_base_url or "https://slack.com/api/"
        self.client = AsyncWebClient(token=config.bot_token.get_secret_value(),
                                     base_url=base.rstrip("/") + "/",
                                     timeout=config.request_timeout_s)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        self._stack.push_async_callback(self.session.close)
        try:
            auth = await self.client.auth_test()
        except SlackApiError as exc:
            raise ConfigError(f"bots.{config.bot}.slack: the bot token was refused "
                              f"({exc.response.get('error', 'error')})") from None
        self.bot_user_id = str(auth.get("user_id", ""))
        self.bot_id = str(auth.get("bot_id", ""))
        self.team = str(auth.get("team_id", ""))
        sender: MessageSender = SlackSender(self.client, team=self.team, limits=config.limits,
                                            bot_id=self.bot_id)
        if self.wrap_sender is not None:
            sender = self.wrap_sender(sender)
        self.outbound = Outbound(sender, self.budget)
        self.handler = Handler(replier=self.replier, outbound=self.outbound, files=self.files,
                               semaphore=self.semaphore, inflight=self.inflight)
        self.handler.serve_redeliveries("slack", config.bot)
        self._stack.push_async_callback(self.handler.aclose)
        self._stack.push_async_callback(self._drain)
        secret = config.signing_secret.get_secret_value() if config.signing_secret else ""
        self.app = AsyncApp(client=self.client, signing_secret=secret,
                            # we handle our own bot's messages in the gate (loop guard)
                            ignoring_self_events_enabled=False,
                            logger=logging.getLogger("slack_bolt"))
        self.app.event("message")(self._on_event)
        self.app.event("app_mention")(self._on_event)
        # One catch-all listener, so an unknown command gets a clear answer too.
        self.app.command(re.compile(r"^/.+"))(self._on_command)
        if config.mode == "socket":
            assert config.app_token is not None
            app_token = config.app_token.get_secret_value()
            socket = AsyncSocketModeHandler(self.app, app_token=app_token,
                                            web_client=self.client)
            # Ask for the websocket URL ourselves: on a bad app token the SDK's
            # connect() would log and retry forever instead of failing.
            try:
                opened = await self.client.apps_connections_open(app_token=app_token)
            except SlackApiError as exc:
                raise ConfigError(
                    f"bots.{config.bot}.slack: the app-level token was refused "
                    f"({exc.response.get('error', 'error')}; Socket Mode needs an xapp- "
                    f"token with connections:write)") from None
            socket.client.wss_uri = str(opened["url"])
            await socket.connect_async()  # type: ignore[no-untyped-call]
            self._stack.push_async_callback(socket.close_async)
            self._socket = socket
        else:
            web_app = web.Application()
            web_app.router.add_post(config.http_path, self._http_request)
            runner = web.AppRunner(web_app)
            await runner.setup()
            self._stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, config.http_host, config.http_port)
            await site.start()
            self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._serving = True
        self._stack.callback(setattr, self, "_serving", False)
        log.info("slack: bot %s connected to team %s (%s mode)", config.bot, self.team,
                 config.mode)

    async def _http_request(self, request: web.Request) -> web.Response:
        """Bolt's aiohttp route, but a body that is not UTF-8 JSON (Slack sends
        nothing else) is a 400: bolt parses before it verifies and would 500."""
        try:
            bolt_request = await to_bolt_request(request)
            if not isinstance(bolt_request.body, dict):
                raise TypeError(type(bolt_request.body).__name__)
        except Exception as exc:  # JSON, UTF-8, or a JSON value bolt cannot read
            log.warning("slack: refused an HTTP request that is not a Slack payload (%s)",
                        type(exc).__name__)
            return web.Response(status=400, text="not a Slack request")
        return await to_aiohttp_response(await self.app.async_dispatch(bolt_request))

    async def is_ready(self) -> bool:
        """For ``/readyz``: Socket Mode connected, or the HTTP server listening."""
        if self._socket is not None:
            return bool(await self._socket.client.is_connected())
        return self._serving

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)

    # events ------------------------------------------------------------------
    async def _on_event(self, event: dict[str, Any], body: dict[str, Any]) -> None:
        """Bolt acks the event for us; this only decides and schedules."""
        subtype = event.get("subtype")
        if subtype not in ANSWERED_SUBTYPES:
            return  # edits, deletions, joins, topic changes...
        channel, ts = str(event.get("channel", "")), str(event.get("ts", ""))
        team = str(body.get("team_id") or self.team)
        if not channel or not ts:
            return
        # A retry (X-Slack-Retry-Num) and the message/app_mention pair are one message.
        if not await self.dedupe.claim(f"slack:{team}:{channel}:{ts}"):
            return
        message, pending = self.normalize(event)
        facts = Facts(
            chat=channel, is_group=message.is_group,
            addressed=event.get("type") == "app_mention"
            or f"<@{self.bot_user_id}>" in str(event.get("text", ""))
            or event.get("parent_user_id") == self.bot_user_id,
            from_bot=bool(event.get("bot_id")) or subtype == "bot_message",
            from_self=(bool(self.bot_id) and event.get("bot_id") == self.bot_id)
            or event.get("user") == self.bot_user_id,
        )
        decision = await self.gate.decide(facts)
        if decision != "answer":
            log.debug("slack: not answering %s:%s (%s)", channel, ts, decision)
            return
        self.handler.submit(message, pending)

    def normalize(self, event: dict[str, Any]) -> tuple[IncomingMessage, list[PendingFile]]:
        """A Slack message event -> ``IncomingMessage`` plus files still to download."""
        channel = str(event["channel"])
        thread = event.get("thread_ts")
        text = str(event.get("text", ""))
        text = text.replace(f"<@{self.bot_user_id}>", "").strip() if self.bot_user_id else text
        # Slack escapes exactly these three characters in message text.
        text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        is_group = event.get("channel_type", "channel") != "im"
        user = str(event.get("user") or event.get("bot_id") or "")
        message = IncomingMessage(
            platform="slack", bot=self.config.bot,
            chat=f"{channel}/{thread}" if thread else channel,
            user=user_key("slack", user), text=text, message_id=str(event["ts"]), user_name=user,
            is_group=is_group, reply_to=str(thread) if thread else None,
        )
        pending = [self._pending(f) for f in event.get("files") or [] if f.get("id")]
        return message, pending

    def _pending(self, file: dict[str, Any]) -> PendingFile:
        size = file.get("size")
        return PendingFile(
            name=str(file.get("name") or file.get("title") or "file"),
            mime_type=str(file.get("mimetype") or "application/octet-stream"),
            size=int(size) if isinstance(size, int) else None,
            download=lambda: self._download(str(file["id"])),
        )

    async def _download(self, file_id: str) -> AsyncIterator[bytes]:
        """files.info for the private url, then stream it with the bot token."""
        try:
            info = await self.client.files_info(file=file_id)
        except SlackApiError as exc:
            raise DeliveryError(f"slack files.info: {exc.response.get('error')}") from exc
        file = info["file"]
        url = str(file.get("url_private_download") or file.get("url_private"))
        headers = {"Authorization": f"Bearer {self.config.bot_token.get_secret_value()}"}
        async with self.session.get(url, headers=headers) as response:
            response.raise_for_status()
            mime = str(file.get("mimetype", ""))
            if response.content_type == "text/html" and not mime.startswith("text/html"):
                # Slack answers a login page, not 401, when the token cannot read the file.
                raise DeliveryError("slack refused the file download (missing files:read?)")
            async for chunk in response.content.iter_chunked(64 * 1024):
                yield chunk

    # slash commands ------------------------------------------------------------
    async def _on_command(self, ack: AsyncAck, command: dict[str, Any],
                          respond: AsyncRespond) -> None:
        """Ack at once (Slack's 3 s), then run the command in a task and respond."""
        await ack()
        task = asyncio.create_task(self._run_command(command, respond))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_command(self, command: dict[str, Any], respond: AsyncRespond) -> None:
        try:
            text = await self._command_text(command)
        except Exception:
            log.exception("slack: command %s failed", command.get("command"))
            text = "Sorry, that command failed; the error is in the bot's log."
        try:
            await respond(text=to_slack(text), response_type="ephemeral")
        except Exception:
            log.warning("slack: could not answer command %s", command.get("command"),
                        exc_info=True)

    async def _command_text(self, command: dict[str, Any]) -> str:
        name = str(command.get("command", "")).lstrip("/")
        if self.commands is None:
            return "Admin commands are not enabled for this bot."
        channel = str(command.get("channel_id", ""))
        caller = Caller(platform="slack", chat=channel, user=str(command.get("user_id", "")),
                        is_group=not channel.startswith("D"))  # D...: a direct message
        # Only an admin of the workspace the bot is installed in (not of a
        # workspace sharing a channel with it); Commands scopes them read-only.
        if (self.config.trust_workspace_admins and not self.commands.is_admin(caller)
                and str(command.get("team_id", "")) == self.team
                and await self._workspace_admin(caller.user)):
            caller = dataclasses.replace(caller, is_platform_admin=True)
        return await self.commands.run(caller, name, str(command.get("text", "")))

    async def _workspace_admin(self, user: str) -> bool:
        """Slack says who administers the workspace (users.info; needs users:read)."""
        try:
            info = await self.client.users_info(user=user)
        except (SlackApiError, aiohttp.ClientError, TimeoutError):
            return False  # fail closed
        profile = info.get("user") or {}
        return bool(profile.get("is_admin") or profile.get("is_owner"))


