"""The NATS subjects a mesh publishes on: each names the mesh (its etcd prefix as one token)
right after the kind (tests/integration/test_mesh_isolation.py: on a real NATS server)."""

from __future__ import annotations

from maas.mesh import batches, captures, usage
from maas.mesh.events import (
    KV_SUBJECT,
    LOAD_SUBJECT,
    PIPELINE_SUBJECT,
    event_subject,
    mesh_token,
    report_subject,
)


def test_every_subject_names_the_mesh():
    assert mesh_token("/maas/") == "maas" and mesh_token("/a/b/") == "a~2fb" and mesh_token("/") == "~"
    assert event_subject("/maas/", "job", "queued") == "maas.events.maas.job.queued"
    assert event_subject("/a/b/") == "maas.events.a~2fb.*.*"
    assert event_subject("/a/b/", "job") == "maas.events.a~2fb.job.*"
    assert report_subject(LOAD_SUBJECT, "/maas/", "w1") == "maas.load.maas.w1"
    assert report_subject(LOAD_SUBJECT, "/maas/") == "maas.load.maas.*"
    assert report_subject(KV_SUBJECT, "/a/b/", "w.1") == "maas.kv.a~2fb.w~2e1"  # one token: '*' still matches
    assert report_subject(PIPELINE_SUBJECT, "/maas/", "r1") == "maas.pipeline.maas.r1"
    assert captures.subject("/maas/", "acme", "eu.bot") == "maas.capture.maas.acme.eu%2Ebot"
    assert captures.subject("/maas/", "", "bot") == "maas.capture.maas._platform.bot"
    assert batches.subject("/a/b/", "batch_1") == "maas.batch.a~2fb.batch_1"
    assert usage.subject("/maas/", "acme") == "maas.usage.maas.acme"

