"""The OpenAPI 3.1 description of the router's HTTP API, served at /openapi.json.

Built from data: the request schemas come from the same field tables the validator uses
(`openai_api.CHAT_FIELDS`, ...), so the description and the behaviour cannot drift.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from maas import __version__
from maas.services.router import openai_api, tokenize
from maas.services.router.openai_api import Field

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str] | None = None, **props: Schema) -> Schema:
    out: Schema = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def _t(kind: str | list[str], description: str = "", **extra: Any) -> Schema:
    out: Schema = {"type": kind, **extra}
    if description:
        out["description"] = description
    return out


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def request_schema(fields: Mapping[str, Field]) -> Schema:
    """A request body: the accepted fields; null means "not given". Others are dropped and
    named in the x-maas-ignored-fields header (refused by a router with --strict-fields)."""
    props = {}
    for name, f in fields.items():
        types: list[str] = list(f.types) if f.required else [*f.types, "null"]
        props[name] = _t(types[0] if len(types) == 1 else types, f.doc)
    return {**_obj([n for n, f in fields.items() if f.required], **props),
            "description": "Fields not listed here are dropped and named in the x-maas-ignored-fields header "
                           "(a router with --strict-fields refuses them)."}


USAGE = _obj(["prompt_tokens", "completion_tokens", "total_tokens"],
             prompt_tokens=_t("integer"), completion_tokens=_t("integer"), total_tokens=_t("integer"),
             prompt_tokens_details=_obj(cached_tokens=_t("integer", "prompt tokens served from the prefix cache")))
FINISH = _t("string", "why generation stopped", enum=["stop", "length"])
NULLABLE_FINISH = _t(["string", "null"], "set on the last chunk only", enum=["stop", "length", None])
LOGPROBS = _t(["object", "null"], "with logprobs: a token the worker sent without its text is named "
                                  "`token_id:<id>`")
COMPLETION_HEAD = {"id": _t("string", "chatcmpl-<request id> or cmpl-<request id>"), "created": _t("integer"),
                   "model": _t("string", "the model as the request named it"),
                   "system_fingerprint": _t("null")}


def _completion(obj: str, choice: Schema) -> Schema:
    return _obj(["id", "object", "created", "model", "choices"], **COMPLETION_HEAD,
                object=_t("string", enum=[obj]), choices=_array(choice), usage=USAGE)


SCHEMAS: dict[str, Schema] = {
    "ChatCompletionRequest": request_schema(openai_api.CHAT_FIELDS),
    "CompletionRequest": request_schema(openai_api.COMPLETION_FIELDS),
    "EmbeddingRequest": request_schema(openai_api.EMBEDDING_FIELDS),
    "ChatCompletion": _completion("chat.completion", _obj(
        ["index", "message", "finish_reason"], index=_t("integer"), finish_reason=FINISH, logprobs=LOGPROBS,
        message=_obj(["role", "content"], role=_t("string", enum=["assistant"]), content=_t("string"),
                     refusal=_t("null")))),
    "ChatCompletionChunk": {**_completion("chat.completion.chunk", _obj(
        ["index", "delta", "finish_reason"], index=_t("integer"), finish_reason=NULLABLE_FINISH,
        logprobs=LOGPROBS, delta=_obj(role=_t("string", enum=["assistant"]), content=_t("string")))),
        "description": "One server-sent event (`data: <json>`). The first carries the role; with "
                       "stream_options.include_usage a last chunk has no choices and the usage; "
                       "`data: [DONE]` ends the stream. An error after the stream started is an "
                       "event `{\"error\": ...}` and the stream ends."},
    "Completion": _completion("text_completion", _obj(
        ["index", "text", "finish_reason"], index=_t("integer"), text=_t("string"), finish_reason=FINISH,
        logprobs=LOGPROBS)),
    "CompletionChunk": _completion("text_completion", _obj(
        ["index", "text", "finish_reason"], index=_t("integer"), text=_t("string"),
        finish_reason=NULLABLE_FINISH, logprobs=LOGPROBS)),
    "EmbeddingList": _obj(
        ["object", "data", "model", "usage"], object=_t("string", enum=["list"]), model=_t("string"),
        data=_array(_obj(["object", "index", "embedding"], object=_t("string", enum=["embedding"]),
                         index=_t("integer"),
                         embedding={"oneOf": [_array(_t("number")),
                                              _t("string", "base64 of little-endian float32")]})),
        usage=_obj(["prompt_tokens", "total_tokens"], prompt_tokens=_t("integer"), total_tokens=_t("integer"))),
    "Model": _obj(
        ["id", "object", "created", "owned_by"], id=_t("string", "a deployment name"),
        object=_t("string", enum=["model"]), created=_t("integer", "0: not known"),
        owned_by=_t("string", enum=[openai_api.OWNER]), version=_t("string", "extension: the version served"),
        task=_t("string", "extension: generate or embed", enum=["generate", "embed"]),
        context_length=_t("integer", "extension; 0 while no replica is ready"),
        ready_replicas=_t("integer", "extension"),
        ready=_t("boolean", "extension: it answers now (a replica is ready; a pipeline always); false for a "
                            "deployment scaled to zero or still loading"),
        parent=_t(["string", "null"], "an adapter served under its own name: the deployment that serves it "
                                      "(vLLM's parent); null otherwise")),
    "ModelList": _obj(["object", "data"], object=_t("string", enum=["list"]), data=_array(_ref("Model"))),
    "BatchRequest": request_schema(openai_api.BATCH_FIELDS),
    "TokenizeRequest": request_schema(tokenize.TOKENIZE_FIELDS),
    "Tokenized": _obj(["count", "max_model_len", "tokens", "token_strs"], count=_t("integer", "len(tokens)"),
                      max_model_len=_t("integer", "the model's context in tokens"),
                      tokens=_array(_t("integer")),
                      token_strs={**_array(_t("string")), "type": ["array", "null"],
                                  "description": "each token as the tokenizer spells it, with return_token_strs; "
                                                 "else null"}),
    "DetokenizeRequest": request_schema(tokenize.DETOKENIZE_FIELDS),
    "Detokenized": _obj(["prompt"], prompt=_t("string", "the text of the tokens, special tokens included")),
    "File": _obj(["id", "object", "bytes", "created_at", "filename", "purpose"], id=_t("string"),
                 object=_t("string", enum=["file"]), bytes=_t("integer"), created_at=_t("integer"),
                 filename=_t("string"), purpose=_t("string", enum=["batch", "batch_output", "fine-tune", "user_data",
                                                                  "evals"]),
                 status=_t("string", enum=["processed"])),
    "FileList": _obj(["object", "data"], object=_t("string", enum=["list"]), data=_array(_ref("File")),
                     has_more=_t("boolean")),
    "FileDeleted": _obj(["id", "object", "deleted"], id=_t("string"), object=_t("string", enum=["file"]),
                        deleted=_t("boolean")),
    "Batch": _obj(
        ["id", "object", "endpoint", "input_file_id", "completion_window", "status", "created_at",
         "request_counts"],
        id=_t("string"), object=_t("string", enum=["batch"]), endpoint=_t("string"), input_file_id=_t("string"),
        completion_window=_t("string"), errors=_t(["object", "null"], "why it failed"),
        status=_t("string", enum=["in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                                  "cancelled"]),
        output_file_id=_t(["string", "null"], "the answers with status 200, one JSON line each"),
        error_file_id=_t(["string", "null"], "the lines answered with an error"),
        created_at=_t("integer"), in_progress_at=_t(["integer", "null"]), expires_at=_t(["integer", "null"]),
        finalizing_at=_t(["integer", "null"]), completed_at=_t(["integer", "null"]),
        failed_at=_t(["integer", "null"]), expired_at=_t(["integer", "null"]),
        cancelling_at=_t(["integer", "null"]), cancelled_at=_t(["integer", "null"]),
        request_counts=_obj(["total", "completed", "failed"], total=_t("integer"), completed=_t("integer"),
                            failed=_t("integer")),
        metadata=_t(["object", "null"])),
    "BatchList": _obj(["object", "data", "has_more"], object=_t("string", enum=["list"]),
                      data=_array(_ref("Batch")), first_id=_t(["string", "null"]), last_id=_t(["string", "null"]),
                      has_more=_t("boolean")),
    "Error": _obj(["error"], error=_obj(
        ["message", "type", "param", "code"], message=_t("string"),
        type=_t("string", "invalid_request_error, authentication_error, permission_error, not_found_error, "
                          "conflict_error, rate_limit_error, cancelled_error, service_unavailable_error, "
                          "timeout_error or server_error"),
        param=_t(["string", "null"], "the parameter at fault"),
        code=_t(["string", "null"], "the gRPC status in lower case (invalid_argument, not_found, ...), or "
                                    "invalid_json, request_too_large, not_found (no such path)"))),
}

ERRORS = {
    str(status): {"description": why, "content": {"application/json": {"schema": _ref("Error")}}}
    for status, why in [
        (400, "invalid JSON, an unknown field, a wrong type or value (param names it)"),
        (401, "a missing or unknown API key"), (403, "the key may not use this model"),
        (404, "no such model or path"), (413, "the body is over the limit (4 MiB)"),
        (429, "over a limit or out of capacity (Retry-After, when known)"),
        (499, "cancelled"), (500, "internal error"), (503, "no ready replica"), (504, "deadline exceeded"),
    ]
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(schema)}}


def _post(summary: str, body: str, reply: str, chunk: str | None = None) -> dict[str, Any]:
    content = _json(reply)
    if chunk is not None:
        content["text/event-stream"] = {"schema": _ref(chunk)}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": _json(body)},
                     "responses": {"200": {"description": "OK", "content": content}, **ERRORS}}}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _t("string")}


def _get(summary: str, reply: str, **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, **extra,
                    "responses": {"200": {"description": "OK", "content": _json(reply)}, **ERRORS}}}


@functools.cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "maas-mesh OpenAI-compatible API", "version": __version__,
                 "description": "The router's HTTP face: OpenAI's chat, completions, embeddings, models, "
                                "files and batches endpoints over the mesh. See docs/http-api.md."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/chat/completions": _post("A chat completion (the worker applies the model's chat template)",
                                          "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"),
            "/v1/completions": _post("A text completion", "CompletionRequest", "Completion", "CompletionChunk"),
            "/v1/embeddings": _post("Embeddings from an embedding model", "EmbeddingRequest", "EmbeddingList"),
            "/v1/models": _get("Every model the key may use, ready or not: deployments, the adapters they serve, "
                               "pipelines", "ModelList"),
            "/v1/models/{model}": _get("One of them", "Model", parameters=[
                {"name": "model", "in": "path", "required": True, "schema": _t("string")}]),
            "/v1/files": {
                "post": {"summary": "Upload a file (purpose `batch`: a batch's requests, one JSON line each)",
                         "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _obj(
                             ["file", "purpose"], file=_t("string", format="binary"), purpose=_t("string"))}}},
                         "responses": {"200": {"description": "OK", "content": _json("File")}, **ERRORS}},
                **_get("The caller's files (`?purpose=` filters)", "FileList")},
            "/v1/files/{file_id}": {**_get("One file", "File", parameters=[_path("file_id")]),
                                    "delete": {"summary": "Delete a file no unfinished batch reads",
                                               "parameters": [_path("file_id")], "responses": {
                                                   "200": {"description": "OK", "content": _json("FileDeleted")},
                                                   **ERRORS}}},
            "/v1/files/{file_id}/content": {"get": {"summary": "A file's bytes", "parameters": [_path("file_id")],
                                                    "responses": {"200": {"description": "OK", "content": {
                                                        "application/octet-stream": {"schema": _t("string")}}},
                                                        **ERRORS}}},
            "/v1/batches": {**_post("Run every line of an uploaded file at the batch class (docs/batches.md)",
                                    "BatchRequest", "Batch"),
                            **_get("The caller's batches, newest first (`?limit=`, `?after=`)", "BatchList")},
            "/v1/batches/{batch_id}": _get("One batch and its progress", "Batch", parameters=[_path("batch_id")]),
            "/v1/batches/{batch_id}/cancel": {"post": {
                "summary": "Stop a batch: what was answered stays in its output", "parameters": [_path("batch_id")],
                "responses": {"200": {"description": "OK", "content": _json("Batch")}, **ERRORS}}},
            "/tokenize": _post("A prompt's (or a chat's) token ids under the model's tokenizer (vLLM's)",
                               "TokenizeRequest", "Tokenized"),
            "/detokenize": _post("The text of token ids under the model's tokenizer (vLLM's)", "DetokenizeRequest",
                                 "Detokenized"),
            "/version": {"get": {"summary": "The mesh's version", "security": [], "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": _obj(
                    ["version"], version=_t("string"))}}}}}},
            "/metrics": {"get": {"summary": "The router's Prometheus metrics (the admin's key only: they name every "
                                            "tenant)", "responses": {"200": {"description": "OK", "content": {
                                                "text/plain": {"schema": _t("string")}}}, **ERRORS}}},
            "/health": {"get": {"summary": "Liveness of the router's HTTP server", "security": [], "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": _obj(
                    ["status"], status=_t("string", enum=["ok"]))}}}}}},
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An API key (`maas keys create`), when the mesh "
                                                          "requires one"}},
        },
    }
