"""Chats rendered into prompts through a model's own tokenizer (its chat template), for the
engines that hold one, for fine-tuning (the prompts training sees), and for a router that
tokenizes prompts to route them (router/kvroute.py). Pure Python: no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from maas.mesh.errors import InvalidArgument
from maas.mesh.tools import native
from maas.services.worker.engines.base import ChatMessage, plain_chat


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage], model: str) -> str:
    """A chat as the prompt `model` continues: its tokenizer's chat template (with the
    generation prompt), or `plain_chat` for a tokenizer without one. Serving and
    fine-tuning (maas.finetune) both render chats here, so training sees the prompts
    inference builds."""
    if not getattr(tokenizer, "chat_template", None):
        return plain_chat(messages)
    try:
        return str(tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                 tokenize=False, add_generation_prompt=True))
    except Exception as exc:  # templates reject chats with raise_exception (e.g. roles out of order)
        raise InvalidArgument(f"the chat template of {model} rejected the messages: {exc}",
                              field="messages") from None


def render_tool_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]], model: str,
                     *, add_generation_prompt: bool = True) -> str | None:
    """A chat with tools through the model's own template, when that template renders tools
    in the format the router reads (`tools.native`); None otherwise."""
    if not native(getattr(tokenizer, "chat_template", None)):
        return None
    try:
        return str(tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt))
    except Exception as exc:  # templates reject chats with raise_exception
        raise InvalidArgument(f"the chat template of {model} rejected the messages: {exc}",
                              field="messages") from None
