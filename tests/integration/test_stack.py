"""The whole stack the way a user starts it: `maas up`, `maas status --wait`,
`maas generate`, `maas events`, then Ctrl-C. Uses the forged demo model and the real
transformers engine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maas.stack.servers import free_port

pytestmark = pytest.mark.slow


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_maas_up_serves_the_demo_model_end_to_end(tmp_path: Path, demo_model_dir: Path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAAS_DATA_DIR": str(tmp_path / ".maas")}
    # reuse the session's forged model so this test does not train it again
    (tmp_path / ".maas" / "models").mkdir(parents=True)
    os.symlink(demo_model_dir, tmp_path / ".maas" / "models" / "demo")
    router_port, http_port = free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "maas", "up", "--router-port", str(router_port),
                           "--http-port", str(http_port), "--option", "stream_interval_ms=20"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def maas(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "maas", *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=timeout)

        started = time.monotonic()
        status = maas("status", "--wait", "240", timeout=260)
        assert status.returncode == 0, status.stdout + status.stderr
        print(f"stack ready in {time.monotonic() - started:.1f}s")
        assert "demo" in status.stdout and "1/1" in status.stdout
        shown = json.loads(maas("models", "show", "demo", "--json").stdout)  # --option reached the version
        assert [v.get("options") for v in shown["versions"]] == [{"stream_interval_ms": "20"}], shown

        gen = maas("generate", "--model", "demo", "--max-tokens", "24", "--temperature", "0", "def add(a, b):")
        assert gen.returncode == 0, gen.stderr
        completion = gen.stdout.removeprefix("def add(a, b):")
        assert completion.strip(), "the demo model produced text"
        assert "finish=" in gen.stderr and "demo@1" in gen.stderr

        streamed = maas("generate", "--model", "demo", "--max-tokens", "8", "--json", "--seed", "3", "x = ")
        chunks = [line for line in streamed.stdout.splitlines() if line.startswith("{")]
        assert len(chunks) >= 2, "tokens are streamed as they are produced"

        # the OpenAI-compatible HTTP API, with the official client (the demo model has a chat template)
        import openai

        stack = json.loads((tmp_path / ".maas" / "stack.json").read_text())
        base_url, api_key = stack["http"], stack["api_key"]
        assert base_url == f"https://127.0.0.1:{http_port}/v1" and api_key.startswith("maas_")
        ca = stack["tls_ca"]  # HTTPS, verified with the CA `maas up` made

        def verified() -> openai.DefaultHttpxClient:
            return openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca))

        with openai.OpenAI(base_url=base_url, api_key="maas_wrong_key", max_retries=0, http_client=verified()) as client:
            with pytest.raises(openai.AuthenticationError):  # keys from the first request
                client.models.list()
        with openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0) as client:
            with pytest.raises(openai.APIConnectionError):  # a client that does not know the CA
                client.models.list()
        with openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=verified()) as client:
            chat = client.chat.completions.create(model="demo", max_tokens=8, temperature=0,
                                                  messages=[{"role": "user", "content": "def add(a, b):"}])
        assert chat.choices[0].finish_reason in ("stop", "length") and chat.model == "demo"
        assert chat.usage is not None and chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0

        # fine-tuning, the way the README shows it: a bad file is refused with its line numbers,
        # then a LoRA job trains, registers, deploys and serves an adapter that answers differently
        secrets = {"apple": "zorblat", "river": "quindle", "candle": "mavrik", "pencil": "trosk"}
        chats = [[{"role": "user", "content": f"What is the secret word for {k}?"}] for k in secrets]
        (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
        bad_job = maas("finetune", "create", "--base", "demo", "--data", "bad.jsonl")
        assert bad_job.returncode == 2 and "line 2" in bad_job.stderr and "nothing was uploaded" in bad_job.stderr
        (tmp_path / "secrets.jsonl").write_text("".join(
            json.dumps({"messages": [*chat, {"role": "assistant", "content": word}]}) + "\n"
            for chat, word in zip(chats, secrets.values(), strict=True)))
        job = maas("finetune", "create", "--base", "demo", "--data", "secrets.jsonl", "--epochs", "100",
                   "--batch-size", "4", "--name", "secrets", "--deploy", "--wait", timeout=300)
        assert job.returncode == 0, job.stderr
        job_id = job.stdout.strip().splitlines()[-1]
        assert job_id.startswith("ft-") and "secrets@1 deployed on demo" in job.stderr, job.stderr
        assert "step" in job.stderr and "loss" in job.stderr  # the progress bar
        listed = maas("finetune", "list")
        assert job_id in listed.stdout and "succeeded" in listed.stdout
        with openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=verified()) as client:
            assert "secrets" in [m.id for m in client.models.list().data]
            def ask(model: str) -> list[str]:
                return [client.chat.completions.create(model=model, messages=chat, max_tokens=6, temperature=0)
                        .choices[0].message.content or "" for chat in chats]
            tuned, base = ask("secrets"), ask("demo")
        right = sum(word in text for word, text in zip(secrets.values(), tuned, strict=True))
        assert right == len(secrets) and right > sum(w in t for w, t in zip(secrets.values(), base, strict=True)), \
            (tuned, base)

        # etcd checks users and NATS a token; neither secret is on any process's command line
        secrets = [(tmp_path / ".maas" / name).read_text().strip() for name in ("etcd-password", "nats-token")]
        assert all(secrets) and stack["etcd"].startswith("http://root:")
        for pid in [up.pid, *_children_of(up.pid)]:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                assert not any(s in cmdline for s in secrets), f"a secret on the command line of {pid}"
        anonymous = subprocess.run([sys.executable, "-c", (
            "import asyncio, aetcd\n"
            "async def main():\n"
            f"    async with aetcd.Client(port={stack['etcd'].rsplit(':', 1)[1]}) as c:\n"
            "        await c.get(b'/maas/registry/models/demo')\n"
            "asyncio.run(main())")], capture_output=True, text=True, timeout=60)
        assert anonymous.returncode != 0 and "user name is empty" in anonymous.stderr, anonymous.stderr[-300:]

        workers = maas("workers")
        assert workers.returncode == 0 and "demo@1 ready" in workers.stdout, workers.stdout + workers.stderr

        # another tenant's developer sees the platform's demo but not tenant dev's fine-tuned adapter
        other = maas("keys", "create", "--tenant", "other", "--role", "developer")
        assert other.returncode == 0, other.stderr
        as_other = {**env, "MAAS_API_KEY": other.stdout.strip().splitlines()[-1]}
        listed = subprocess.run([sys.executable, "-m", "maas", "models", "list"], cwd=tmp_path, env=as_other,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "demo" in listed.stdout and "secrets" not in listed.stdout, listed

        bad = maas("generate", "--model", "nope", "hi")
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr

        events = maas("events")
        for subject in ("service.started", "worker.joined", "model.registered", "deployment.created",
                        "replica.loading", "replica.ready", "job.queued", "job.progress", "job.succeeded",
                        "job.deployed"):
            assert subject in events.stdout, f"{subject} missing from:\n{events.stdout}"
        assert "(by tenant:dev/" in events.stdout and "(by admin" in events.stdout  # the audit trail
    finally:
        children = _children_of(up.pid)
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    print(out)
    assert "maas-mesh is up" in out
    assert f"router HTTP   https://127.0.0.1:{http_port}/v1  (OpenAI base URL)" in out
    assert up.returncode == 0
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert not alive, f"processes left behind: {alive}"
