"""A chat with tools reaches the model through its own chat template when that template
renders tools in the format the router reads, and through plain turns otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from maas.mesh.tools import SYSTEM, split_calls
from maas.services.worker.engines import create_engine
from maas.services.worker.engines.base import ModelSpec
from maas.services.worker.service import render_messages
from maas.v1 import inference_pb2

# a Hermes-style template, as Qwen's: tools in a system block, calls as <tool_call>, results
# in <tool_response>
HERMES = (
    "{% if tools %}<|system|>\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    "Call a function as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>{{ eos_token }}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|user|>\n<tool_response>\n{{ m.content }}\n</tool_response>{{ eos_token }}\n"
    "{% elif m.tool_calls %}<|assistant|>\n{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}"
    "{{ eos_token }}\n"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

TOOL = inference_pb2.Tool(name="get_time", description="the time in a zone",
                          parameters=json.dumps({"type": "object", "properties": {"zone": {"type": "string"}}}))
CHAT = [inference_pb2.ChatMessage(role="user", content="time in Paris?"),
        inference_pb2.ChatMessage(role="assistant", tool_calls=[
            inference_pb2.ToolCall(id="c1", name="get_time", arguments='{"zone": "CET"}')]),
        inference_pb2.ChatMessage(role="tool", tool_call_id="c1", content="12:00")]


@pytest.fixture
def hermes_model(demo_model_dir: Path, tmp_path: Path) -> Path:
    model = tmp_path / "hermes"
    shutil.copytree(demo_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = HERMES
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    return model


async def test_a_template_that_renders_tools_gets_them_as_they_are(hermes_model: Path) -> None:
    engine = create_engine(ModelSpec("hermes", 1, "hf", str(hermes_model)), own_process=False)
    await engine.load()
    try:
        prompt = render_messages(engine, CHAT, [TOOL])
    finally:
        await engine.close()
    assert prompt.startswith("<|system|>\n# Tools\n<tools>") and SYSTEM.splitlines()[0] not in prompt
    assert '"name": "get_time"' in prompt and "<tool_response>\n12:00\n</tool_response>" in prompt
    content, calls = split_calls(prompt.split("<|assistant|>\n")[1], ["get_time"])
    assert [json.loads(c.arguments) for c in calls] == [{"zone": "CET"}]  # the call, as the router reads it


async def test_any_other_template_gets_plain_turns(demo_model_dir: Path) -> None:
    engine = create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir)), own_process=False)
    await engine.load()
    try:
        prompt = render_messages(engine, CHAT, [TOOL])
    finally:
        await engine.close()
    assert SYSTEM.splitlines()[0] in prompt and "<|tool|>\n12:00" in prompt
