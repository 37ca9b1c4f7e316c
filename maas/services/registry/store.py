"""Model and version metadata in etcd.

Version numbers are allocated with a transaction that compares the model key's revision,
so two concurrent registrations never get the same number.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from maas.mesh.artifacts import ARTIFACT, check_digest
from maas.mesh.authz import caller, hidden, owner_for_new, require_owner
from maas.mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from maas.mesh.etcd import EtcdSession
from maas.mesh.names import validate_name
from maas.services.registry.blobs import BlobStore
from maas.v1 import common_pb2, registry_pb2, scheduler_pb2

FORMATS = ("hf", "sim", "pipeline", "index")
ROUTER_FORMATS = ("pipeline", "index")  # used by the routers: no replicas, no devices
TASKS = ("generate", "embed")
DEFAULT_SIM_MEMORY = 64 * 1024 * 1024
DEFAULT_HUB_MEMORY = 2 * 1024 * 1024 * 1024
ADMIN_OPTIONS = ("trust_remote_code",)  # options that run code from the model's source


def parse_ref(ref: str) -> tuple[str, str]:
    """'name' -> (name, 'latest'); 'name@3' -> (name, '3'); 'name@prod' -> (name, 'prod')."""
    name, _, selector = ref.partition("@")
    validate_name(name, "model")
    return name, selector or "latest"


def estimate_memory(fmt: str, source: str) -> int:
    """Device memory one replica needs: weights on disk plus 25% for activations and KV cache."""
    if fmt == "sim":
        return DEFAULT_SIM_MEMORY
    path = Path(source).expanduser()
    if not path.is_dir():
        return DEFAULT_HUB_MEMORY
    weights = sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    return int(weights * 1.25) + 32 * 1024 * 1024


def looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().is_dir()


def check_source(fmt: str, source: str, *, adapter: bool = False, blobs: BlobStore | None = None) -> tuple[str, int]:
    """Validate a model source (blocking file-system checks) -> (normalised source, memory estimate)."""
    if source.startswith(ARTIFACT):
        sha = check_digest(source.removeprefix(ARTIFACT))
        if blobs is None:
            raise InvalidArgument("this registry stores no artifacts", field="source")
        return source, int(blobs.size(sha) * 1.25) + 32 * 1024 * 1024
    if fmt == "hf":
        if not source:
            raise InvalidArgument("source is required for format hf: a local directory or a hub id", field="source")
        if looks_local(source):
            path = Path(source).expanduser().resolve()
            marker = "adapter_config.json" if adapter else "config.json"
            if not (path / marker).is_file():
                what = "an adapter" if adapter else "a model"
                raise InvalidArgument(f"source {source!r} is not {what} directory (no {marker})", field="source")
            source = str(path)
    return source, estimate_memory(fmt, source)


class ModelStore:
    def __init__(self, session: EtcdSession, blobs: BlobStore | None = None) -> None:
        self.session = session
        self.keys = session.keys
        self.blobs = blobs

    async def register(self, req: registry_pb2.RegisterModelRequest) -> registry_pb2.ModelVersion:
        validate_name(req.name)
        fmt = req.format or "hf"
        if fmt not in FORMATS:
            raise InvalidArgument(f"format {fmt!r} is not supported: use one of {', '.join(FORMATS)}", field="format")
        task = req.task or "generate"
        if task not in TASKS:
            raise InvalidArgument(f"task {task!r} is not supported: use one of {', '.join(TASKS)}", field="task")
        owner = owner_for_new(req.owner)
        if fmt == "pipeline":
            await self._check_pipeline(req)
        if fmt == "index":
            await self._check_index(req)
        await self._check_source_allowed(req, owner)
        if req.source.strip().startswith(ARTIFACT):
            await self.check_artifact(check_digest(req.source.strip().removeprefix(ARTIFACT)))
        base = ""
        if req.base:
            try:
                base_version = await self.resolve(req.base)
            except NotFound as e:
                raise InvalidArgument(f"base {req.base!r} does not exist: {e.message}", field="base") from None
            if base_version.base:
                raise InvalidArgument(f"base {req.base!r} is itself an adapter", field="base")
            base = f"{base_version.name}@{base_version.version}"
        source, memory = await asyncio.to_thread(check_source, fmt, req.source.strip(), adapter=bool(base),
                                                 blobs=self.blobs)
        resources = common_pb2.Resources()
        resources.CopyFrom(req.resources)
        if fmt in ROUTER_FORMATS:  # used by the routers: no device of its own
            resources.memory_bytes, resources.devices = 0, 0
        else:
            resources.memory_bytes = resources.memory_bytes or memory
            resources.devices = resources.devices or 1

        client, tx = self.session.client, self.session.client.transactions
        model_key = self.keys.model(req.name)
        for _ in range(20):
            got = await client.get(model_key)
            model = registry_pb2.Model()
            if got is None:
                model.name, model.description, model.owner = req.name, req.description, owner
                model.created_ms = int(time.time() * 1000)
                guard = tx.create(model_key) == 0
            else:
                model.ParseFromString(got.value)
                self._may_add_version(model, owner)
                guard = tx.mod(model_key) == got.mod_revision
            model.latest_version += 1
            model.latest_format = fmt
            version = registry_pb2.ModelVersion(
                name=req.name, version=model.latest_version, format=fmt, source=source, base=base,
                task=task, resources=resources, options=dict(req.options), metadata=dict(req.metadata),
                created_ms=int(time.time() * 1000), owner=model.owner)
            ok, _ = await client.transaction(
                compare=[guard],
                success=[tx.put(model_key, model.SerializeToString()),
                         tx.put(self.keys.version(req.name, version.version), version.SerializeToString())],
                failure=[])
            if ok:
                return version
        raise FailedPrecondition(f"model {req.name!r} is being registered concurrently; retry")

    async def _check_pipeline(self, req: registry_pb2.RegisterModelRequest) -> None:
        """A pipeline's source is its uploaded YAML; it must parse, and the models its steps
        call must exist for the caller (a model, or a deployment, by name). Every problem is
        reported with its line (`maas.pipelines.spec`)."""
        from maas.pipelines import package
        from maas.pipelines.spec import SpecErrors, parse

        if req.base:
            raise InvalidArgument("a pipeline has no base model (its steps name the models they call)", field="base")
        source = req.source.strip()
        if not source.startswith(ARTIFACT) or self.blobs is None:
            raise InvalidArgument("a pipeline's source is its uploaded YAML or package, artifact:<sha256> (`maas "
                                  "pipeline push NAME FILE|DIR` uploads and registers it)", field="source")
        sha = check_digest(source.removeprefix(ARTIFACT))
        await self.check_artifact(sha)
        blobs = self.blobs
        if await asyncio.to_thread(blobs.size, sha) > package.MAX_PACKAGE_BYTES:
            raise InvalidArgument(f"a pipeline's package is at most {package.MAX_PACKAGE_BYTES} bytes", field="source")
        data = b"".join(await asyncio.to_thread(lambda: list(blobs.read(sha))))
        try:
            pack = await asyncio.to_thread(package.read, data)
        except package.PackageError as e:
            raise InvalidArgument(str(e), field="source") from None
        where = f"{req.name}.yaml"
        spec = parse(pack.spec, source=where, files=pack.files if pack.files else None)
        problems = []
        for step in spec.steps.values():
            if step.kind == "plugin":
                module = str(step.options["plugin"]).partition(":")[0]
                if not pack.has_module(module):
                    problems.append((step.line, f"step {step.name!r}: plugin module {module!r} is not in the "
                                                f"pipeline's package (push a directory holding "
                                                f"{module.replace('.', '/')}.py beside pipeline.yaml)"))
            model = step.options.get("model")
            if model and not await self._callable(str(model)):
                problems.append((step.line, f"step {step.name!r}: model {model!r} does not exist"))
            index = step.options.get("index")
            if index and not await self._is_index(str(index)):
                problems.append((step.line, f"step {step.name!r}: index {index!r} does not exist "
                                            "(`maas index build` makes one)"))
        if problems:
            raise SpecErrors(problems, where)

    async def _is_index(self, ref: str) -> bool:
        try:
            return (await self.resolve(ref)).format == "index"
        except (NotFound, InvalidArgument):
            return False

    async def _check_index(self, req: registry_pb2.RegisterModelRequest) -> None:
        """An index is an uploaded artifact (`maas index build`) pinned to the embedding
        model version that made its vectors (option embed_model)."""
        if req.base or not req.source.strip().startswith(ARTIFACT):
            raise InvalidArgument("an index's source is its uploaded directory, artifact:<sha256> (`maas index "
                                  "build` makes and registers one)", field="source")
        embed = req.options.get("embed_model", "")
        try:
            version = await self.resolve(embed) if embed else None
        except (NotFound, InvalidArgument):
            version = None
        if version is None or version.task != "embed":
            raise InvalidArgument(f"option embed_model must name the embedding model version that built the index, "
                                  f"not {embed!r}", field="options")

    async def _callable(self, ref: str) -> bool:
        """Can the caller ask for `ref`: a model (or version) it may see, or a deployment?"""
        try:
            await self.resolve(ref)
            return True
        except (NotFound, InvalidArgument):
            raw = await self.session.get(self.keys.deployment(ref.partition("@")[0]))
            return raw is not None and caller().may_see(scheduler_pb2.Deployment.FromString(raw).owner)

    @staticmethod
    async def _check_source_allowed(req: registry_pb2.RegisterModelRequest, owner: str) -> None:
        """Sources that read the registry's host and options that run the model's code are
        the admin's to register (a tenant uploads a directory instead)."""
        if caller().is_admin:
            return
        source = req.source.strip()
        if source and not source.startswith(ARTIFACT) and await asyncio.to_thread(looks_local, source):
            raise PermissionDenied("a local path reads the registry's own disk, so only the admin may register "
                                   "one; upload the directory instead (`maas models upload NAME DIR`)", field="source")
        for option in ADMIN_OPTIONS:
            if option in req.options:
                raise PermissionDenied(f"option {option!r} runs code from the model's source; only the admin "
                                       "may set it", field="options")

    @staticmethod
    def _may_add_version(model: registry_pb2.Model, owner: str) -> None:
        name = model.name
        require_owner(model.owner, f"model {name!r} is not registered", f"model {name!r}")
        if caller().trusted and owner != model.owner:
            raise FailedPrecondition(f"model {name!r} belongs to {model.owner or 'the platform'}; a new version "
                                     f"for {owner or 'the platform'} needs another name", field="name")

    async def get_model(self, name: str) -> registry_pb2.Model:
        validate_name(name, "model")
        raw = await self.session.get(self.keys.model(name))
        missing = f"model {name!r} is not registered"
        if raw is None:
            raise NotFound(missing)
        model = registry_pb2.Model.FromString(raw)
        hidden(model.owner, missing)
        return model

    async def list_models(self) -> list[registry_pb2.Model]:
        """The models the caller may see (its tenant's and the platform's)."""
        me = caller()
        pairs, _ = await self.session.get_prefix(self.keys.models())
        return sorted((m for m in (registry_pb2.Model.FromString(v) for _, v in pairs) if me.may_see(m.owner)),
                      key=lambda m: m.name)

    async def uploaded(self, sha: str) -> None:
        """Remember that the calling tenant uploaded `sha` (artifacts are shared by content,
        so who may read one is recorded apart from the bytes)."""
        tenant = caller().tenant
        if tenant:
            await self.session.client.put(self.keys.upload(tenant, sha), b"")

    async def check_artifact(self, sha: str) -> None:
        """NotFound, as for a missing artifact, unless the caller may read `sha`: the admin and
        services may; a tenant if it uploaded it or can see a version made of it."""
        me = caller()
        if me.trusted or await self.session.get(self.keys.upload(me.tenant, sha)) is not None:
            return
        models = {m.name: m.owner for m in await self.list_models()}
        pairs, _ = await self.session.get_prefix(self.keys.versions())
        for _, raw in pairs:
            v = registry_pb2.ModelVersion.FromString(raw)
            if v.name in models and sha in (v.artifact_digest, v.source.removeprefix(ARTIFACT)):
                return
        raise NotFound(f"artifact {sha} does not exist")

    async def artifact_user(self, sha: str) -> str:
        """What still needs an artifact: a model version made from it, an unfinished
        fine-tuning job reading it (its dataset or the checkpoint it resumes from), or a
        file (docs/batches.md) holding it; "" if nothing does."""
        from maas.mesh.jobs import TERMINAL
        from maas.v1 import batches_pb2, jobs_pb2

        versions, _ = await self.session.get_prefix(self.session.keys.versions())
        for _, raw in versions:
            v = registry_pb2.ModelVersion.FromString(raw)
            if sha in (v.artifact_digest, v.source.removeprefix("artifact:")):
                return f"model version {v.name}@{v.version}"
        jobs, _ = await self.session.get_prefix(self.session.keys.jobs())
        for _, raw in jobs:
            job = jobs_pb2.Job.FromString(raw)
            if job.state not in TERMINAL and sha in (job.spec.dataset_sha256, job.checkpoint_sha256):
                return f"fine-tuning job {job.id}"
        files, _ = await self.session.get_prefix(self.session.keys.files())
        for _, raw in files:
            file = batches_pb2.File.FromString(raw)
            if file.sha256 == sha:
                return f"file {file.id}"
        return ""

    async def list_versions(self, name: str) -> list[registry_pb2.ModelVersion]:
        await self.get_model(name)
        pairs, _ = await self.session.get_prefix(self.keys.versions(name))
        return [registry_pb2.ModelVersion.FromString(v) for _, v in pairs]

    async def resolve(self, ref: str) -> registry_pb2.ModelVersion:
        name, selector = parse_ref(ref)
        model = await self.get_model(name)
        if selector == "latest":
            number = model.latest_version
        elif selector.isdigit():
            number = int(selector)
        elif selector in model.aliases:
            number = model.aliases[selector]
        else:
            raise NotFound(f"model {name!r} has no version or alias {selector!r}")
        raw = await self.session.get(self.keys.version(name, number))
        if raw is None:
            raise NotFound(f"model {name!r} has no version {number}")
        version = registry_pb2.ModelVersion.FromString(raw)
        version.owner = model.owner  # versions stored before owners existed carry none
        return version

    async def set_alias(self, name: str, alias: str, version: int) -> registry_pb2.Model:
        validate_name(alias, "alias")
        if alias == "latest" or alias.isdigit():
            raise InvalidArgument(f"alias {alias!r} is reserved", field="alias")
        client, tx = self.session.client, self.session.client.transactions
        for _ in range(20):
            got = await client.get(self.keys.model(name))
            if got is None:
                raise NotFound(f"model {name!r} is not registered")
            model = registry_pb2.Model.FromString(got.value)
            require_owner(model.owner, f"model {name!r} is not registered", f"model {name!r}")
            if await self.session.get(self.keys.version(name, version)) is None:
                raise NotFound(f"model {name!r} has no version {version}")
            model.aliases[alias] = version
            ok, _ = await client.transaction(
                compare=[tx.mod(self.keys.model(name)) == got.mod_revision],
                success=[tx.put(self.keys.model(name), model.SerializeToString())], failure=[])
            if ok:
                return model
        raise AlreadyExists(f"model {name!r} changed concurrently; retry")

    async def delete_version(self, name: str, version: int) -> None:
        """Delete one version, unless a deployment, an alias or an adapter still uses it."""
        ref = f"{name}@{version}"
        model = await self.get_model(name)
        require_owner(model.owner, f"model {name!r} is not registered", f"model {name!r}")
        raw = await self.session.get(self.keys.version(name, version))
        if raw is None:
            raise NotFound(f"model {name!r} has no version {version}")
        pairs, _ = await self.session.get_prefix(self.keys.deployments())
        for _, value in pairs:
            dep = scheduler_pb2.Deployment.FromString(value)
            if dep.resolved_version == ref or any(t.model == ref for t in dep.traffic):
                raise FailedPrecondition(f"{ref} is used by deployment {dep.name!r}; delete or move the deployment first")
        for alias, target in model.aliases.items():
            if target == version:
                raise FailedPrecondition(f"{ref} is the target of alias {name}@{alias}; move the alias first")
        pairs, _ = await self.session.get_prefix(self.keys.models())
        for _, value in pairs:
            other = registry_pb2.Model.FromString(value)
            versions, _ = await self.session.get_prefix(self.keys.versions(other.name))
            for _, v in versions:
                if registry_pb2.ModelVersion.FromString(v).base == ref:
                    raise FailedPrecondition(f"{ref} is the base of adapter {other.name}; delete the adapter first")
        await self.session.client.delete(self.keys.version(name, version))
