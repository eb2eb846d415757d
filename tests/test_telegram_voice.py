"""Telegram messages without text still get an answer: voice and video notes
(transcribed through a provider's ``/audio/transcriptions``, or declined in a
sentence), stickers, locations, and anything else unreadable.

The REAL python-telegram-bot against the fake Bot API, the real ``openai``
SDK against the fake OpenAI server for both the answer and the transcription.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from adapters.chat.handler import VOICE_FAILED, VOICE_UNSUPPORTED
from adapters.platforms.telegram import UNREADABLE
from engine.errors import ConfigError
from engine.ports import Transcriber
from engine.providers.registry import ProviderConfig, build_provider
from tests.conftest import BotPipeline
from tests.fakes.openai_server import FakeOpenAI, Status
from tests.fakes.telegram_server import FakeTelegram, start_telegram_fake
from tests.test_telegram import adapter as telegram_adapter
from tests.test_telegram import last_text, shown

CHAT = 7
OGG = b"OggS\x00\x02fake opus voice note"
MP4 = b"\x00\x00\x00\x18ftypmp42 fake round video"


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with start_telegram_fake() as fake:
        yield fake


@pytest.fixture
async def whisper(openai_fake: FakeOpenAI) -> AsyncIterator[Transcriber]:
    """A provider as configured with ``transcription_model = "whisper-1"``."""
    provider = build_provider(ProviderConfig(
        name="speech", kind="openai", model="gpt-4o-mini", base_url=openai_fake.base_url,
        api_key=SecretStr("sk-test"), transcription_model="whisper-1"))
    assert isinstance(provider, Transcriber)
    async with provider:  # type: ignore[attr-defined]
        yield provider


def _adapter(tg: FakeTelegram, pipeline: BotPipeline, transcriber: Transcriber | None) -> object:
    built = telegram_adapter(tg, pipeline)
    built.handler.transcriber = transcriber
    return built


async def _answered(tg: FakeTelegram, pipeline: BotPipeline) -> str:
    await asyncio.wait_for(pipeline.replied.wait(), 30)
    await tg.wait_for(lambda: last_text(tg, CHAT) == shown(pipeline.replies[0]))  # type: ignore[arg-type]
    return str(pipeline.fake.requests[0].messages[-1]["content"])


async def test_a_voice_note_is_transcribed_and_answered(
    tg: FakeTelegram, bot_pipeline: BotPipeline, whisper: Transcriber
) -> None:
    tg.add_file("V1", OGG, "voice/file_1.oga")
    async with _adapter(tg, bot_pipeline, whisper):  # type: ignore[attr-defined]
        tg.push_message(CHAT, voice={"file_id": "V1", "file_unique_id": "uV1", "duration": 2,
                                     "mime_type": "audio/ogg", "file_size": len(OGG)})
        prompt = await _answered(tg, bot_pipeline)
    [audio] = bot_pipeline.fake.transcriptions
    assert (audio.model, audio.filename, audio.content_type, audio.data) == (
        "whisper-1", "voice.ogg", "audio/ogg", OGG)
    assert prompt == "What is the capital of France?"  # the words, answered as text
    assert bot_pipeline.files is not None and await bot_pipeline.files.recent("demo") == []


async def test_a_video_note_is_transcribed_too(
    tg: FakeTelegram, bot_pipeline: BotPipeline, whisper: Transcriber
) -> None:
    bot_pipeline.fake.transcription = "Hello from a round video."
    tg.add_file("N1", MP4, "video_notes/file_2.mp4")
    async with _adapter(tg, bot_pipeline, whisper):  # type: ignore[attr-defined]
        tg.push_message(CHAT, video_note={"file_id": "N1", "file_unique_id": "uN1",
                                          "length": 240, "duration": 3, "file_size": len(MP4)})
        prompt = await _answered(tg, bot_pipeline)
    [audio] = bot_pipeline.fake.transcriptions
    assert (audio.filename, audio.content_type, audio.data) == ("video_note.mp4", "video/mp4", MP4)
    assert prompt == "Hello from a round video."


async def test_without_speech_to_text_voice_is_declined_in_words(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    tg.add_file("V2", OGG, "voice/file_3.oga")
    async with _adapter(tg, bot_pipeline, None):  # type: ignore[attr-defined]
        tg.push_message(CHAT, voice={"file_id": "V2", "file_unique_id": "uV2", "duration": 2,
                                     "mime_type": "audio/ogg", "file_size": len(OGG)})
        await tg.wait_for(lambda: last_text(tg, CHAT) == VOICE_UNSUPPORTED)
    assert bot_pipeline.fake.count == 0 and bot_pipeline.fake.transcriptions == []


async def test_a_failed_transcription_says_so(
    tg: FakeTelegram, bot_pipeline: BotPipeline, whisper: Transcriber
) -> None:
    bot_pipeline.fake.transcription_error = Status(500)
    tg.add_file("V3", OGG, "voice/file_4.oga")
    async with _adapter(tg, bot_pipeline, whisper):  # type: ignore[attr-defined]
        tg.push_message(CHAT, voice={"file_id": "V3", "file_unique_id": "uV3", "duration": 2,
                                     "mime_type": "audio/ogg", "file_size": len(OGG)})
        await tg.wait_for(lambda: last_text(tg, CHAT) == VOICE_FAILED)
    assert bot_pipeline.fake.count == 0  # nothing half-heard was sent to the model


async def test_a_sticker_reaches_the_model_in_words(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    async with _adapter(tg, bot_pipeline, None):  # type: ignore[attr-defined]
        tg.push_message(CHAT, sticker={
            "file_id": "S1", "file_unique_id": "uS1", "type": "regular", "width": 512,
            "height": 512, "is_animated": False, "is_video": False, "emoji": "😂"})
        prompt = await _answered(tg, bot_pipeline)
    assert prompt == "[sends a sticker: 😂]"


async def test_a_location_reaches_the_model_in_words(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    async with _adapter(tg, bot_pipeline, None):  # type: ignore[attr-defined]
        tg.push_message(CHAT, location={"latitude": 48.858370, "longitude": 2.294481})
        prompt = await _answered(tg, bot_pipeline)
    assert prompt == "[shares a location: latitude 48.85837, longitude 2.29448]"


async def test_anything_else_unreadable_gets_a_sentence(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    async with _adapter(tg, bot_pipeline, None):  # type: ignore[attr-defined]
        tg.push_message(CHAT, contact={"phone_number": "+10000000000", "first_name": "Bob"})
        await tg.wait_for(lambda: last_text(tg, CHAT) == UNREADABLE)
    assert bot_pipeline.fake.count == 0


async def test_config_transcription_model_and_bot_cap_are_wired(
    openai_fake: FakeOpenAI, tmp_path: Path
) -> None:
    """As a user writes it: the first provider of the bot's chain with a
    ``transcription_model`` transcribes; ``local`` cannot have one."""
    from adapters.wiring.build import build_app
    from adapters.wiring.platforms import transcriber_for
    from adapters.wiring.settings import load_settings

    (tmp_path / "b.toml").write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"
[providers.chat]
kind = "openai_compatible"
base_url = "{openai_fake.base_url}"
model = "chat-model"
[providers.speech]
kind = "openai"
base_url = "{openai_fake.base_url}"
model = "gpt-4o-mini"
api_key_env = "SPEECH_KEY"
transcription_model = "whisper-1"
[bots.demo]
chain = ["chat", "speech"]
max_output_tokens = 200
[bots.demo.memory]
enabled = false
[bots.plain]
chain = ["chat"]
[bots.plain.memory]
enabled = false
""", encoding="utf-8")
    settings = load_settings(tmp_path / "b.toml", environ={"SPEECH_KEY": "sk-x"})
    async with build_app(settings) as app:
        speech = transcriber_for(app, "demo")
        assert speech is not None and speech.name == "speech"
        assert await speech.transcribe(OGG, filename="voice.ogg", mime_type="audio/ogg") == (
            "What is the capital of France?")
        assert transcriber_for(app, "plain") is None
        assert app.conversations["demo"].max_output_tokens == 200
    bad = tmp_path / "bad.toml"
    bad.write_text('[providers.demo]\nkind = "local"\ntranscription_model = "whisper-1"\n',
                   encoding="utf-8")
    with pytest.raises(ConfigError, match="transcription_model"):
        load_settings(bad, environ={})
