"""Long-term memory on object storage: LanceDB on a local S3 server.

moto runs in server mode on 127.0.0.1 (a real HTTP S3 endpoint), LanceDB
talks to it through its own object-store client, exactly as it would to AWS
or MinIO with ``memory_uri = "s3://bucket/prefix"`` and
``memory_storage_options``. The real embedding model; each "worker" is its
own LanceDB connection; the shared-memory writers serialize through the real
Redis (``RedisState.lock``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from engine.types import Fact
from persistence.redis.state import RedisState
from persistence.vectors.chain import LocalHeads
from persistence.vectors.memory import LanceMemoryStore
from persistence.vectors.shared import SharedMemory

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> tuple[str, Any]:
    name = f"mem-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket=name)
    return name, client


def _options(endpoint: str) -> dict[str, str]:
    # What a user writes under [storage] memory_storage_options (keys from env).
    return {"aws_endpoint": endpoint, "aws_region": "us-east-1", "allow_http": "true",
            "aws_access_key_id": "test", "aws_secret_access_key": "test"}


def _keys(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


FACTS = [
    ("u1", "is allergic to peanuts"), ("u1", "lives in Lisbon"), ("u1", "plays the cello"),
    ("u2", "prefers tea over coffee"), ("u2", "works as a nurse on night shifts"),
] + [("u3", f"collected stamp number {i}") for i in range(40)]


async def test_import_and_recall_on_s3(
    s3_endpoint: str, bucket: tuple[str, Any], embedder: Any
) -> None:
    name, client = bucket
    uri = f"s3://{name}/boternity/lancedb"
    facts = [Fact(id="", text=text, bot="helper", user=user) for user, text in FACTS]
    async with await LanceMemoryStore.open(uri, embedder,
                                           storage_options=_options(s3_endpoint)) as store:
        stored = await store.add_many(facts)
        assert len(stored) == len(FACTS)
        hits = await store.search("helper", "what food must I avoid", users=["u1"], limit=2)
        assert hits[0].text == "is allergic to peanuts"
        assert all(h.user == "u1" for h in hits)
    # Everything lives in the bucket under the prefix...
    keys = _keys(client, name, "boternity/lancedb/")
    assert any(k.endswith(".lance") for k in keys)
    assert any("/_versions/" in k for k in keys)
    # ... and another worker (a fresh connection) reads it all back.
    async with await LanceMemoryStore.open(uri, embedder,
                                           storage_options=_options(s3_endpoint)) as other:
        assert await other.count("helper") == len(FACTS)
        hits = await other.search("helper", "hot drinks", users=["u2"], limit=1)
        assert hits[0].text == "prefers tea over coffee"


async def test_two_workers_write_one_bot_nothing_lost(
    s3_endpoint: str, bucket: tuple[str, Any], embedder: Any
) -> None:
    name, _ = bucket
    uri = f"s3://{name}/mem"
    opts = _options(s3_endpoint)
    async with await LanceMemoryStore.open(uri, embedder, storage_options=opts) as one, \
            await LanceMemoryStore.open(uri, embedder, storage_options=opts) as two:
        await one.add(Fact(id="", text="first fact", bot="b", user="u"))  # creates the table

        async def write(store: LanceMemoryStore, worker: int) -> None:
            for i in range(6):
                await store.add(Fact(id="", text=f"worker {worker} fact {i}", bot="b", user="u"))

        await asyncio.gather(write(one, 1), write(two, 2))
        assert await one.count("b") == 13
        assert await two.count("b") == 13
        texts = {f.text async for f in two.iterate("b")}
        assert {f"worker {w} fact {i}" for w in (1, 2) for i in range(6)} <= texts


async def test_shared_memory_writes_from_two_workers(
    s3_endpoint: str, bucket: tuple[str, Any], embedder: Any
) -> None:
    name, _ = bucket
    uri = f"s3://{name}/shared"
    opts = _options(s3_endpoint)
    ns = f"test-{uuid.uuid4().hex[:12]}"
    try:
        redis_a = RedisState(REDIS_URL, namespace=ns)
        redis_b = RedisState(REDIS_URL, namespace=ns)
        await redis_a.__aenter__()
    except OSError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    heads = LocalHeads()  # the chain head: one database for both workers, as in the app
    async with redis_b:
        worker_a = await SharedMemory.open(
            uri, embedder, storage_options=opts,
            writer_lock=lambda: redis_a.lock("shared-memory"), heads=heads)
        worker_b = await SharedMemory.open(
            uri, embedder, storage_options=opts,
            writer_lock=lambda: redis_b.lock("shared-memory"), heads=heads)
        async with worker_a, worker_b:
            await asyncio.gather(*(
                (worker_a if i % 2 else worker_b).publish(
                    Fact(id="", text=f"team fact {i}: the office moved to floor {i}",
                         bot="alpha" if i % 2 else "beta"),
                    "public")
                for i in range(12)
            ))
            assert await worker_a.count() == 12
            report = await worker_b.verify()
            # One linear hash chain, though two processes appended to it.
            assert report.checked == 12
            assert report.tampered == () and report.missing == ()
            # Each worker recalls what the other wrote.
            hits = await worker_a.search("alpha", [], "which floor is the office on",
                                         users=[""], limit=12)
            assert {h.author_bot for h in hits} == {"alpha", "beta"}
    await redis_a.__aexit__(None, None, None)
