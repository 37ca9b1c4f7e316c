"""Chat rendering in the engines (the worker renders; it owns the tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from maas.mesh.errors import FailedPrecondition, InvalidArgument
from maas.services.worker.engines import create_engine
from maas.services.worker.engines.base import ChatMessage, ModelSpec, plain_chat

CHAT = [ChatMessage("system", "You are terse."), ChatMessage("user", "Hi!")]


def test_plain_chat_format() -> None:
    assert plain_chat(CHAT) == "System: You are terse.\n\nUser: Hi!\n\nAssistant:"


def test_roles_are_checked() -> None:
    with pytest.raises(InvalidArgument, match="'robot'") as err:
        ChatMessage("robot", "beep")
    assert err.value.field == "messages"
    for role in ("system", "user", "assistant", "tool"):
        ChatMessage(role, "")


def test_sim_renders_the_plain_format() -> None:
    sim = create_engine(ModelSpec("sim", 1, "sim", ""))
    assert sim.render_chat(CHAT) == plain_chat(CHAT)


async def test_hf_applies_the_models_chat_template_or_falls_back(demo_model_dir: Path) -> None:
    engine = create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir)))
    with pytest.raises(FailedPrecondition):
        engine.render_chat(CHAT)
    await engine.load()
    try:
        # the forged demo model's template: <|role|>\ncontent</s>\n ... then <|assistant|>\n
        assert engine.render_chat(CHAT) == ("<|system|>\nYou are terse.</s>\n<|user|>\nHi!</s>\n"
                                            "<|assistant|>\n")
        tokenizer = engine._tokenizer  # type: ignore[attr-defined]
        template, tokenizer.chat_template = tokenizer.chat_template, None
        try:
            assert engine.render_chat(CHAT) == plain_chat(CHAT)
            tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
            with pytest.raises(InvalidArgument, match="roles must alternate") as err:
                engine.render_chat(CHAT)
            assert err.value.field == "messages"
        finally:
            tokenizer.chat_template = template
    finally:
        await engine.close()
