"""Redis-shared state against the real Redis on 127.0.0.1:6379.

Each "worker" here is its own connection and its own objects, as in separate
processes (tests/test_workers.py does it with real processes). Every test
uses a fresh key namespace, so parallel runs never collide.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pybreaker
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from adapters.chat.handler import Handler
from adapters.chat.outbound import Limits, Outbound
from engine.types import IncomingMessage, Reply
from persistence.redis.breakers import SharedBreakers
from persistence.redis.connection import connect, stop
from persistence.redis.inflight import OnceStore, RedisInflight, event_key
from persistence.redis.state import RedisEventClaims, RedisRateBudget, RedisState
from tests.cluster import RedisProxy

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _redis_up() -> bool:
    client = aioredis.from_url(REDIS_URL)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    if not await _redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{ns}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def _wait(shared: SharedBreakers, name: str, state: str) -> None:
    async with asyncio.timeout(5):
        await shared.wait_for(name, state)


class Boom(Exception):
    pass


def _fail() -> None:
    raise Boom("provider down")


calls: list[str] = []


def _ok() -> str:
    calls.append("called")
    return "ok"


async def test_open_breaker_in_one_worker_stops_the_others(namespace: str) -> None:
    async with SharedBreakers(REDIS_URL, namespace=namespace) as a_shared, \
            SharedBreakers(REDIS_URL, namespace=namespace) as b_shared:
        a = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=60,
                                     state_storage=a_shared.storage("primary"))
        b = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=60,
                                     state_storage=b_shared.storage("primary"))
        with pytest.raises(Boom):
            a.call(_fail)
        with pytest.raises(pybreaker.CircuitBreakerError):
            a.call(_fail)  # second failure trips it
        assert a.current_state == "open"

        await _wait(b_shared, "primary", "open")
        calls.clear()
        with pytest.raises(pybreaker.CircuitBreakerError):
            b.call(_ok)
        assert calls == []  # worker B never called the dead provider
        assert b.current_state == "open"

        # A worker that starts later loads the open state from Redis.
        await a_shared.flush()
        async with SharedBreakers(REDIS_URL, namespace=namespace) as c_shared:
            c = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=60,
                                         state_storage=c_shared.storage("primary"))
            await _wait(c_shared, "primary", "open")
            with pytest.raises(pybreaker.CircuitBreakerError):
                c.call(_ok)
            assert calls == []


async def test_recovery_closes_the_breaker_everywhere(namespace: str) -> None:
    async with SharedBreakers(REDIS_URL, namespace=namespace) as a_shared, \
            SharedBreakers(REDIS_URL, namespace=namespace) as b_shared:
        a = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=0.05,
                                     state_storage=a_shared.storage("p"))
        b = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=60,
                                     state_storage=b_shared.storage("p"))
        with pytest.raises(pybreaker.CircuitBreakerError):
            a.call(_fail)
        await _wait(b_shared, "p", "open")
        # After A's reset timeout, its trial call succeeds and closes the breaker.
        await asyncio.sleep(0.06)
        assert a.call(_ok) == "ok"
        assert a.current_state == "closed"
        await _wait(b_shared, "p", "closed")
        assert b.call(_ok) == "ok"


async def test_breaker_names_are_independent(namespace: str) -> None:
    async with SharedBreakers(REDIS_URL, namespace=namespace) as a_shared, \
            SharedBreakers(REDIS_URL, namespace=namespace) as b_shared:
        a = pybreaker.CircuitBreaker(fail_max=1, state_storage=a_shared.storage("dead"))
        b_other = pybreaker.CircuitBreaker(fail_max=1, state_storage=b_shared.storage("alive"))
        b_dead = pybreaker.CircuitBreaker(fail_max=1, state_storage=b_shared.storage("dead"))
        with pytest.raises(pybreaker.CircuitBreakerError):
            a.call(_fail)
        await _wait(b_shared, "dead", "open")
        assert b_dead.current_state == "open"
        assert b_other.call(_ok) == "ok"


async def test_two_workers_share_one_chat_budget(namespace: str) -> None:
    async with RedisState(REDIS_URL, namespace=namespace) as one, \
            RedisState(REDIS_URL, namespace=namespace) as two:
        clock = asyncio.get_running_loop().time
        calls = []  # (started, took, wait) per reservation
        for i in range(6):
            state = one if i % 2 == 0 else two
            started = clock()
            wait = await state.budget.reserve("telegram:chat-1", 0.5)
            calls.append((started, clock() - started, wait))
        # Six slots 0.5 s apart, wherever they were taken: slot i is i * 0.5 s after
        # the first. Time spent between calls (a busy machine) shortens each wait by
        # exactly that much, so the slot is measured as wait + elapsed; the only
        # slack is each call's own duration (when Redis read its clock) + ms rounding.
        first, first_took, _ = calls[0]
        for i, (started, took, wait) in enumerate(calls):
            slot = wait + (started - first)
            assert i * 0.5 - took - 0.002 <= slot <= i * 0.5 + first_took + 0.002, calls
        # Another chat has its own budget.
        assert await two.budget.reserve("telegram:chat-2", 0.5) == 0


async def test_budget_burst_and_retry_after(namespace: str) -> None:
    async with RedisState(REDIS_URL, namespace=namespace) as one, \
            RedisState(REDIS_URL, namespace=namespace) as two:
        clock = asyncio.get_running_loop().time
        # burst 3: three immediate slots, then paced: the fourth is 1 s after the
        # first (less the time the calls themselves took on a busy machine).
        started = clock()
        waits = [await one.budget.reserve("slack:T1", 1.0, burst=3) for _ in range(4)]
        assert waits[:3] == [0, 0, 0]
        assert 1.0 - (clock() - started) - 0.002 <= waits[3] <= 1.0, waits
        # A 429 seen by one worker holds back the other for the rest of its 5 s.
        started = clock()
        await one.budget.penalize("discord:c9", 5)
        held = await two.budget.reserve("discord:c9", 0.1)
        assert 5 - (clock() - started) - 0.002 <= held <= 5, held


async def test_event_claimed_once_then_done(namespace: str) -> None:
    async with RedisState(REDIS_URL, namespace=namespace) as one, \
            RedisState(REDIS_URL, namespace=namespace) as two:
        results = await asyncio.gather(
            *(s.claims.try_claim("slack:Ev1") for s in (one, two, one, two))
        )
        assert sorted(results) == ["busy", "busy", "busy", "claimed"]
        owner = one if results[0] == "claimed" or results[2] == "claimed" else two
        await owner.claims.done("slack:Ev1")
        assert await one.claims.try_claim("slack:Ev1") == "done"
        assert await two.claims.try_claim("slack:Ev1") == "done"


async def test_released_event_is_handled_by_a_redelivery(namespace: str) -> None:
    async with RedisState(REDIS_URL, namespace=namespace) as one, \
            RedisState(REDIS_URL, namespace=namespace) as two:
        assert await one.claims.claim("telegram:42")
        assert not await two.claims.claim("telegram:42")
        assert await two.claims.try_claim("telegram:42") == "busy"
        await two.claims.release("telegram:42")  # not its claim: no effect
        assert not await two.claims.claim("telegram:42")
        await one.claims.release("telegram:42")
        assert await two.claims.claim("telegram:42")


async def test_dedupe_claim_expires_after_its_ttl(namespace: str) -> None:
    # 1 s: far above a busy machine's pause between the first two claims.
    async with RedisState(REDIS_URL, namespace=namespace) as one:
        assert await one.claims.claim("slack:T:C:1.0", ttl_s=1.0)
        assert not await one.claims.claim("slack:T:C:1.0", ttl_s=1.0)
        # The ttl itself is under test: wait out what Redis says is left of it.
        client = aioredis.from_url(REDIS_URL)
        left_ms = await client.pttl(f"{namespace}:event:slack:T:C:1.0")
        await client.aclose()
        assert 0 < left_ms <= 1000
        await asyncio.sleep(left_ms / 1000 + 0.05)
        assert await one.claims.claim("slack:T:C:1.0", ttl_s=1.0)


# Leases in these tests: short enough to wait out, long enough that a busy
# machine's pause between a claim and the next check cannot let one run out
# (renewals come every third of it, so two missed rounds are still tolerated).
LEASE_S = 1.0


async def test_dead_workers_lease_expires_live_one_keeps_its_own(namespace: str) -> None:
    client_dead = aioredis.from_url(REDIS_URL, decode_responses=True)
    client_live = aioredis.from_url(REDIS_URL, decode_responses=True)
    dead = RedisEventClaims(client_dead, namespace, lease_s=LEASE_S)
    live = RedisEventClaims(client_live, namespace, lease_s=LEASE_S)
    other = RedisEventClaims(client_live, namespace, lease_s=LEASE_S)
    try:
        assert await dead.try_claim("ev-dead") == "claimed"
        assert await live.try_claim("ev-live") == "claimed"
        # "kill -9": the dead worker's renewals stop; nothing is released.
        assert dead._renewer is not None
        dead._renewer.cancel()
        await client_dead.aclose()
        assert await other.try_claim("ev-dead") == "busy"
        # The lease runs out on Redis' clock; the redelivery comes after that.
        left_ms = await client_live.pttl(f"{namespace}:event:ev-dead")
        assert 0 < left_ms <= LEASE_S * 1000
        await asyncio.sleep(left_ms / 1000 + 0.05)
        assert await other.try_claim("ev-dead") == "claimed"
        # The live worker renewed its lease all along: still its own.
        assert await other.try_claim("ev-live") == "busy"
        await live.done("ev-live")
        assert await other.try_claim("ev-live") == "done"
    finally:
        await live.close()
        await other.close()
        await client_live.aclose()


# --- replies in flight: a worker killed mid-reply loses nothing -------------

MESSAGE = IncomingMessage(platform="slack", bot="helper", chat="C1", user="U1",
                          text="what is the capital of France?", message_id="1700000000.0001")


async def test_dead_workers_reply_is_taken_over_once(namespace: str) -> None:
    taken: list[IncomingMessage] = []
    arrived = asyncio.Event()

    def resubmit(message: IncomingMessage) -> None:
        taken.append(message)
        arrived.set()

    async with RedisInflight(REDIS_URL, namespace=namespace, lease_s=LEASE_S) as live, \
            RedisInflight(REDIS_URL, namespace=namespace, lease_s=LEASE_S) as bystander:
        live.route("slack", "helper", resubmit)
        bystander.route("telegram", "helper", resubmit)  # serves another platform only
        dead = RedisInflight(REDIS_URL, namespace=namespace, lease_s=LEASE_S)
        await dead.__aenter__()
        assert await dead.begin(MESSAGE)
        assert not await live.begin(MESSAGE)  # a live lease: not ours
        await dead.__aexit__(None, None, None)  # kill -9: no finish, renewals stop
        assert taken == []  # the lease has not run out yet
        async with asyncio.timeout(5):
            await arrived.wait()  # the live worker's sweeper took it over
        assert taken == [MESSAGE]
        assert (live.taken_over, bystander.taken_over) == (1, 0)
        assert await live.sweep() == 0 and await bystander.sweep() == 0  # taken once
        # The resubmitted message goes through begin() again: ours now.
        assert await live.begin(MESSAGE)
        await live.finish(MESSAGE)
        assert not await bystander.begin(MESSAGE)  # answered: a redelivery is dropped
        assert await live.client.zcard(f"{namespace}:inflight") == 0


async def test_handler_answers_duplicates_once(namespace: str) -> None:
    sent: list[tuple[str, str]] = []

    class Sender:
        scope = "slack:T1"
        limits = Limits(max_len=3000, dm_interval_s=0.0, group_interval_s=0.0)

        async def send(self, chat: str, text: str, reply_to: str | None = None) -> str:
            sent.append((chat, text))
            return f"m{len(sent)}"

        async def edit(self, chat: str, message_id: str, text: str) -> None:
            sent.append((chat, text))

    class Replier:
        calls = 0

        async def reply(self, message: IncomingMessage) -> AsyncIterator[str | Reply]:
            Replier.calls += 1
            yield "Paris."
            yield Reply(text="Paris.", served_by="primary")

    async with RedisInflight(REDIS_URL, namespace=namespace, lease_s=5) as one, \
            RedisInflight(REDIS_URL, namespace=namespace, lease_s=5) as two:
        workers = [Handler(replier=Replier(), outbound=Outbound(Sender()), inflight=inflight)
                   for inflight in (one, two)]
        results = await asyncio.gather(*(
            workers[i % 2].submit(MESSAGE) for i in range(4)))  # a retry storm
        assert Replier.calls == 1
        assert sum(r is not None for r in results) == 1
        assert sent[-1] == ("C1", "Paris.")


async def test_a_reply_finished_during_a_redis_blip_is_recorded_when_redis_is_back(
    namespace: str
) -> None:
    """The answer went out but ``finish`` met no Redis: the worker keeps the
    lease and records it at the next renewal, so nobody answers it again."""
    async with RedisProxy() as proxy, \
            RedisInflight(proxy.url, namespace=namespace, lease_s=LEASE_S) as worker, \
            RedisInflight(REDIS_URL, namespace=namespace, lease_s=LEASE_S) as other:
        assert await worker.begin(MESSAGE)
        proxy.cut()  # Redis gone for this worker, the reply is delivered meanwhile
        with pytest.raises((RedisError, OSError)):
            await worker.finish(MESSAGE)
        await proxy.restore()
        await worker.renew()  # the next renewal round
        assert not await other.begin(MESSAGE)  # answered: not taken over, not re-answered
        assert await other.client.exists(f"{namespace}:answered:{event_key(MESSAGE)}")


async def test_taken_over_user_message_is_stored_once(namespace: str, tmp_path: Any) -> None:
    from persistence.sql.conversations import SqlConversationStore
    from persistence.sql.database import Database

    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}") as db, \
            RedisInflight(REDIS_URL, namespace=namespace, lease_s=LEASE_S) as live:
        sql = SqlConversationStore(db)
        store = OnceStore(sql, live)

        async def worker(inflight: RedisInflight) -> int:
            # One reply task: begin() binds the event, then the user message is committed.
            assert await inflight.begin(MESSAGE)
            return await store.add(bot="helper", chat="C1", role="user", content=MESSAGE.text,
                                   user_name="Ann")

        dead = RedisInflight(REDIS_URL, namespace=namespace, lease_s=LEASE_S)
        await dead.__aenter__()
        first = await asyncio.create_task(worker(dead))
        await dead.__aexit__(None, None, None)  # died before answering
        resubmitted = asyncio.Event()
        live.route("slack", "helper", lambda m: resubmitted.set())
        async with asyncio.timeout(5):
            await resubmitted.wait()  # the lease ran out; the live sweeper took it over
        again = await asyncio.create_task(worker(live))
        assert again == first
        await store.add(bot="helper", chat="C1", role="assistant", content="Paris.")
        assert [(m.content, m.user_name) for m in await store.history("helper", "C1")] == [
            (MESSAGE.text, "Ann"), ("Paris.", "")]  # the speaker's name goes through
        # Outside a reply (no event bound) it is a plain store.
        assert await store.add(bot="helper", chat="C2", role="user", content="x",
                               user_name="Bo") > first
        assert [m.user_name for m in await store.history("helper", "C2")] == ["Bo"]


async def test_breaker_events_survive_a_dropped_connection(namespace: str) -> None:
    async with SharedBreakers(REDIS_URL, namespace=namespace) as a_shared, \
            SharedBreakers(REDIS_URL, namespace=namespace) as b_shared:
        a = pybreaker.CircuitBreaker(fail_max=1, state_storage=a_shared.storage("p"))
        b_shared.storage("p")
        # Redis drops every connection of worker B (a restart, a network blink).
        admin = aioredis.from_url(REDIS_URL, decode_responses=True)
        try:
            clients = await admin.client_list()
            mine = [c["id"] for c in clients if c.get("name") == b_shared.client_name]
            assert mine
            for client_id in mine:
                await admin.client_kill_filter(_id=client_id)
        finally:
            await admin.aclose()
        with pytest.raises(pybreaker.CircuitBreakerError):
            a.call(_fail)
        await a_shared.flush()
        # B resubscribes and reloads: it sees the breaker A opened meanwhile.
        await _wait(b_shared, "p", "open")


async def test_without_redis_a_worker_paces_alone_and_still_answers() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    dead = aioredis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True)
    try:
        # The local pacing's clock stands still: the waits are the schedule
        # itself, not the schedule minus however long this machine took.
        budget = RedisRateBudget(dead, "test-dead", clock=lambda: 1000.0)
        waits = [await budget.reserve("telegram:chat-1", 0.5) for _ in range(3)]
        assert waits == [0, 0.5, 1.0]
        await budget.penalize("telegram:chat-2", 5)
        held = await budget.reserve("telegram:chat-2", 0.1)
        assert held == 5
        claims = RedisEventClaims(dead, "test-dead")
        assert await claims.claim("slack:T:C:1.0")  # a duplicate beats a lost message
        await claims.release("slack:T:C:1.0")  # no error either
    finally:
        await dead.aclose()


async def test_a_redis_that_stops_answering_costs_one_timeout_not_one_per_call(
    namespace: str
) -> None:
    """Budgets and claims share one outage: after a command timed out, the
    next calls take their fallback at once instead of each waiting a timeout."""
    async with RedisProxy() as proxy, RedisState(proxy.url, namespace=namespace) as state:
        proxy.blackhole()  # Redis stops answering
        assert await state.claims.claim("slack:T:C:1.0")  # timed out: handled anyway
        asked = proxy.asked
        assert await state.claims.claim("slack:T:C:2.0")
        assert await state.budget.reserve("slack:chat:C", 1.0) == 0  # paced alone
        await state.budget.penalize("slack:chat:C", 2.0)
        assert await state.budget.reserve("telegram:chat:9", 1.0) == 0
        turns = state.turns("slack:demo")  # the loop guard counts alone meanwhile
        assert [await turns.take("C", 2) for _ in range(3)] == [True, True, False]
        assert proxy.asked == asked  # nothing more was sent to the silent Redis


async def test_stop_ends_tasks_whose_cancellation_redis_swallowed(namespace: str) -> None:
    """Background loops end even when redis-py swallows their cancellation.

    Cancelled in the middle of a command, redis-py's asyncio client sometimes
    eats the CancelledError and the loop goes on (redis/redis-py#2028): a
    worker's ``__aexit__`` then waited forever (seen as a 120 s hang of the
    take-over tests). Each loop here runs EVALs back to back on the real
    client, as the renew and sweep loops do, and is stopped at a different
    point of its command; every ``stop`` must return with its task done.
    """
    client = await connect(REDIS_URL)
    progressed = asyncio.Event()

    async def loop() -> None:
        while True:
            try:
                await client.eval("return redis.call('PING')", 0)
                progressed.set()
            except Exception:  # as the real loops do: a Redis blip, next round
                await asyncio.sleep(0)

    try:
        for trial in range(8):  # with a read timeout most stops meet a swallowed cancel
            progressed.clear()
            task = asyncio.create_task(loop())
            await progressed.wait()  # mid-loop: the next EVAL is in flight
            for _ in range(trial % 4):
                await asyncio.sleep(0)  # a different point of the command each time
            await asyncio.wait_for(stop([task]), timeout=30)
            assert task.done(), f"trial {trial}: the loop outlived stop()"
    finally:
        await client.aclose()
