"""Dapr's HTTP API: one route table over the blocks; decode, await, encode."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from pillion.api.http import codec
from pillion.blocks.bindings import BindingsBlock
from pillion.blocks.configuration import ConfigurationBlock
from pillion.blocks.health import Health
from pillion.blocks.invoke import InvokeBlock, InvokeRequest, continue_trace
from pillion.blocks.lock import LockBlock
from pillion.blocks.metadata import MetadataBlock
from pillion.blocks.pubsub import PubSubBlock
from pillion.blocks.secrets import SecretsBlock
from pillion.blocks.state import StateBlock
from pillion.errors import Code, GrpcCode, PillionError, direct_invoke, unimplemented
from pillion.observability.dapr_metrics import DaprMetrics
from pillion.observability.tracing import (
    SERVER,
    SharedAttributes,
    Span,
    Tracer,
)
from pillion.transport.http import Request, Response

log = logging.getLogger("pillion.api.http")
api_log = logging.getLogger("pillion.api.http.calls")

# Building blocks whose routes exist in Dapr but not yet here: answer 501 naming the block
# rather than falling through to service invocation.
_LATER_BLOCKS: dict[str, str] = {
    "actors": "actors",
    "workflows": "workflow",
    "jobs": "jobs",
    "crypto": "cryptography",
    "subtlecrypto": "cryptography",
    "conversation": "conversation",
}
_VERSIONS = frozenset({"v1.0", "v1.0-alpha1", "v1.0-alpha2", "v1.0-beta1"})


@dataclass
class HttpApi:
    """The handler the HTTP server calls for every request on the API port."""

    app_id: str
    health: Health
    state: StateBlock
    invoke: InvokeBlock
    metadata: MetadataBlock
    request_shutdown: Callable[[], None]
    pubsub: PubSubBlock | None = None
    lock: LockBlock | None = None
    secrets: SecretsBlock | None = None
    bindings: BindingsBlock | None = None
    configuration: ConfigurationBlock | None = None
    api_logging: bool = False
    omit_health_checks: bool = False  # logging.apiLogging.omitHealthChecks
    api_token: str | None = None
    tracer: Tracer | None = None
    metrics: DaprMetrics | None = None

    @classmethod
    def with_env(cls, **kw: object) -> HttpApi:
        api = cls(**kw)  # type: ignore[arg-type]
        api.api_token = os.environ.get("DAPR_API_TOKEN") or None
        return api

    async def __call__(self, req: Request) -> Response:
        tracer = self.tracer
        metrics = self.metrics
        if tracer is None and metrics is None and not self.api_logging:
            return await self._route(req)
        t0 = time.perf_counter()
        span: Span | None = None
        if tracer is not None and tracer.enabled and not req.path.startswith(_HEALTH):
            # What this call does next (invoke, publish, bindings) continues this trace.
            span, traceparent = continue_trace(tracer, req.headers, req.path, SERVER)
            resp = await self._route(req)
            # Every route builds its own header list, so appending in place is safe.
            resp.headers.append((b"traceparent", traceparent))
            if span is not None:
                _end_api_span(span, req, resp)
        else:
            resp = await self._route(req)
        ms = (time.perf_counter() - t0) * 1000
        if metrics is not None:
            metrics.http_server(
                req.method, req.path, resp.status, ms, len(req.body), len(resp.body)
            )
        if self.api_logging and not (self.omit_health_checks and req.path.startswith(_HEALTH)):
            api_log.info(
                "HTTP API Called",
                extra={
                    "fields": {
                        "method": f"{req.method} {req.path}",
                        "code": resp.status,
                        "duration": round(ms, 3),
                        "useragent": (req.header(b"user-agent") or b"").decode("latin-1"),
                    }
                },
            )
        return resp

    async def _route(self, req: Request) -> Response:
        try:
            return await self._dispatch(req)
        except _Unauthorized:
            return Response(401, [(b"content-type", b"text/plain")], b"invalid api token")
        except PillionError as err:
            return codec.error(err)
        except Exception as exc:  # a bug: keep the contract (JSON body), log it once
            log.exception("unhandled error serving %s %s", req.method, req.path)
            return codec.error(
                PillionError(Code.ERROR, f"internal error: {type(exc).__name__}", 500)
            )

    async def _dispatch(self, req: Request) -> Response:
        path = req.path
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"
        # The header form of invocation wins over any route (dapr-api.md §1.1).
        app_hdr = req.header(b"dapr-app-id")
        if app_hdr is not None:
            self._check_token(req)
            return await self._invoke(req, app_hdr.decode("utf-8", "replace"), path[1:])
        parts = path.split("/")  # ["", "v1.0", "state", ...]
        if len(parts) < 3 or parts[1] not in _VERSIONS:
            self._check_token(req)
            return await self._fallback(req, path)
        version, block = parts[1], parts[2]
        rest = parts[3:]
        if block == "healthz":
            return self._healthz(req, rest)
        self._check_token(req)
        if block == "invoke" and version == "v1.0":
            return await self._invoke_path(req, rest)
        if block == "state":
            return await self._state(req, version, rest)
        if block == "publish" and self.pubsub is not None:
            return await self._publish(req, version, rest)
        if block == "bindings" and version == "v1.0":
            return await self._bindings(req, rest)
        if block == "secrets" and version == "v1.0":
            return await self._secrets(req, rest)
        if block == "configuration" and version in ("v1.0", "v1.0-alpha1"):
            return await self._configuration(req, rest)
        if block in ("lock", "unlock"):
            return await self._lock(req, version, block, rest)
        if block == "metadata" and version == "v1.0":
            return self._metadata(req, rest)
        if block == "shutdown" and version == "v1.0":
            _allow(req, "POST")
            self.request_shutdown()
            return codec.no_content()
        if block in _LATER_BLOCKS:
            raise unimplemented(_LATER_BLOCKS[block])
        return await self._fallback(req, path)

    # --- auth ---------------------------------------------------------------------------------

    def _check_token(self, req: Request) -> None:
        if self.api_token is None:
            return
        if req.header(b"dapr-api-token") != self.api_token.encode():
            raise _Unauthorized()

    # --- health / metadata --------------------------------------------------------------------

    def _healthz(self, req: Request, rest: list[str]) -> Response:
        _allow(req, "GET", "HEAD")
        if rest == ["outbound"]:
            self.health.check_outbound()
            return codec.no_content()
        if rest:
            raise _not_found(req)
        appid = _query(req).get("appid")
        self.health.check(appid)
        return codec.no_content()

    def _metadata(self, req: Request, rest: list[str]) -> Response:
        if not rest:
            _allow(req, "GET")
            return codec.json_response(self.metadata.snapshot())
        if len(rest) == 1:
            _allow(req, "PUT")
            self.metadata.set(unquote(rest[0]), req.body.decode("utf-8", "replace"))
            return codec.no_content()
        raise _not_found(req)

    # --- service invocation -------------------------------------------------------------------

    async def _invoke_path(self, req: Request, rest: list[str]) -> Response:
        # /v1.0/invoke/{appId}/method/{method...}
        if len(rest) < 2 or rest[1] != "method":
            raise _not_found(req)
        app_id = unquote(rest[0])
        method = "/".join(rest[2:])
        return await self._invoke(req, app_id, method)

    async def _invoke(self, req: Request, app_id: str, method: str) -> Response:
        if app_id.startswith(("http://", "https://")):
            raise unimplemented("external service invocation (HTTPEndpoint)")
        resp = await self.invoke.invoke(
            InvokeRequest(app_id, method, req.method, req.query, req.headers, req.body, req.peer)
        )
        headers = resp.headers
        if any(k.startswith(b"pillion-") for k, _ in headers):
            # Link headers meant for gRPC callers (a gRPC app's status) stop here.
            headers = [(k, v) for k, v in headers if not k.startswith(b"pillion-")]
        return Response(resp.status, headers, resp.body, resp.reason)

    async def _fallback(self, req: Request, path: str) -> Response:
        basic = _basic_auth_app_id(req)
        if basic:
            return await self._invoke(req, basic, path[1:])
        raise direct_invoke(
            "failed getting app id either from the URL path or the header dapr-app-id", 404
        )

    # --- pub/sub ------------------------------------------------------------------------------

    async def _publish(self, req: Request, version: str, rest: list[str]) -> Response:
        assert self.pubsub is not None
        _allow(req, "POST", "PUT")
        bulk = bool(rest) and rest[0] == "bulk"
        if bulk:
            rest = rest[1:]
        elif version != "v1.0":
            raise _not_found(req)
        pubsub = unquote(rest[0]) if rest else ""
        topic = "/".join(unquote(t) for t in rest[1:])
        md = codec.query_metadata(_query(req))
        trace = _trace_headers(req)
        if bulk:
            entries = codec.decode_bulk_publish(req.body)
            failed = await self.pubsub.bulk_publish(pubsub, topic, entries, md, **trace)
            return codec.bulk_publish_response(failed)
        ctype = req.header(b"content-type")
        await self.pubsub.publish(
            pubsub,
            topic,
            req.body,
            content_type=ctype.decode("latin-1") if ctype else None,
            metadata=md,
            **trace,
        )
        return codec.no_content()

    # --- bindings -----------------------------------------------------------------------------

    async def _bindings(self, req: Request, rest: list[str]) -> Response:
        # /v1.0/bindings/{name}; no block means no bindings: the block gives Dapr's answer.
        if len(rest) != 1 or not rest[0]:
            raise _not_found(req)
        _allow(req, "POST", "PUT")
        bindings = self.bindings or BindingsBlock(self.app_id, {})
        data, md, operation = codec.decode_binding(req.body)
        md = {**md, **{k: v for k, v in _trace_headers(req).items() if v}}
        resp = await bindings.invoke(unquote(rest[0]), operation, data, md)
        headers = [(b"metadata." + k.encode(), v.encode()) for k, v in resp.metadata.items()]
        if not resp.data:
            return Response(204, headers, b"")
        if not any(k.lower() == "content-type" for k in resp.metadata):
            headers.append((b"content-type", b"application/json"))
        return Response(200, headers, resp.data)

    # --- secrets ------------------------------------------------------------------------------

    async def _secrets(self, req: Request, rest: list[str]) -> Response:
        # No block means no secret stores: the block itself gives Dapr's answer for that.
        secrets = self.secrets or SecretsBlock(self.app_id, {})
        # /v1.0/secrets/{store}/bulk and /v1.0/secrets/{store}/{key}
        if len(rest) < 2 or not rest[0] or not rest[1]:
            raise _not_found(req)
        _allow(req, "GET")
        store = unquote(rest[0])
        md = codec.query_metadata(_query(req))
        if rest[1:] == ["bulk"]:
            return codec.json_response(await secrets.bulk(store, md))
        data = await secrets.get(store, unquote("/".join(rest[1:])), md)
        # Dapr answers 204 when the store gave nothing back.
        return codec.json_response(data) if data else codec.no_content()

    # --- configuration --------------------------------------------------------------------------

    async def _configuration(self, req: Request, rest: list[str]) -> Response:
        # /configuration/{store}, /{store}/subscribe and /{store}/{id}/unsubscribe, all GET.
        if not rest or not rest[0] or len(rest) > 3:
            raise _not_found(req)
        _allow(req, "GET")
        # No block means no configuration stores: the block itself gives Dapr's answer.
        conf = self.configuration or ConfigurationBlock(self.app_id, {})
        store = unquote(rest[0])
        if len(rest) == 3:
            if rest[2] != "unsubscribe" or not rest[1]:
                raise _not_found(req)
            sub_id = unquote(rest[1])
            if await conf.unsubscribe(sub_id, store):
                return codec.json_response({"ok": True})
            return codec.json_response(
                {"ok": False, "message": f"subscription with id {sub_id} does not exist"}, 500
            )
        pairs = parse_qsl(req.query.decode("latin-1"), keep_blank_values=True) if req.query else []
        keys = [v for k, v in pairs if k == "key"]
        md = codec.query_metadata(_query(req))
        if len(rest) == 2:
            if rest[1] != "subscribe":
                raise _not_found(req)
            sub_id = await conf.subscribe_app(store, keys, md)
            return codec.json_response({"id": sub_id})
        items = await conf.get(store, keys, md)
        if not items:
            return codec.no_content()
        return codec.json_response(
            {
                k: {"value": i.value, "version": i.version, "metadata": i.metadata}
                for k, i in items.items()
            }
        )

    # --- distributed lock (alpha) ---------------------------------------------------------------

    async def _lock(self, req: Request, version: str, block: str, rest: list[str]) -> Response:
        # /v1.0-alpha1/lock/{store} and /v1.0-alpha1/unlock/{store}; both answer 200 JSON.
        if version != "v1.0-alpha1" or len(rest) != 1 or not rest[0]:
            raise _not_found(req)
        _allow(req, "POST")
        # No block means no lock stores: the block itself gives Dapr's answer for that.
        lock = self.lock or LockBlock(self.app_id, {})
        store = unquote(rest[0])
        if block == "lock":
            resource_id, owner, expiry = codec.decode_try_lock(req.body)
            won = await lock.try_lock(store, resource_id, owner, expiry)
            return codec.json_response({"success": won})
        resource_id, owner = codec.decode_unlock(req.body)
        status = await lock.unlock(store, resource_id, owner)
        return codec.json_response({"status": int(status)})

    # --- state --------------------------------------------------------------------------------

    async def _state(self, req: Request, version: str, rest: list[str]) -> Response:
        if not rest or not rest[0]:
            raise _not_found(req)
        store = unquote(rest[0])
        q = _query(req)
        md = codec.query_metadata(q)
        if version == "v1.0-alpha1" and rest[1:] == ["query"]:
            _allow(req, "POST", "PUT")
            return codec.query_response(await self.state.query(store, req.body, md))
        if version != "v1.0":
            raise _not_found(req)
        if len(rest) == 1:
            _allow(req, "POST", "PUT")
            items = codec.decode_save(req.body, md)
            await self.state.save(store, items)
            return codec.no_content()
        sub = rest[1:]
        if sub == ["bulk"] and req.method in ("POST", "PUT"):
            keys, body_md = codec.decode_bulk_get(req.body)
            items_out = await self.state.bulk_get(store, keys, metadata={**body_md, **md})
            return codec.bulk_get_response(items_out)
        if sub == ["transaction"] and req.method in ("POST", "PUT"):
            ops, body_md = codec.decode_transaction(req.body)
            await self.state.transaction(store, ops, {**body_md, **md})
            return codec.no_content()
        key = unquote("/".join(sub))
        if req.method == "GET":
            res = await self.state.get(
                store, key, consistency=codec.consistency(q.get("consistency")), metadata=md
            )
            if res is None:
                return codec.no_content()
            headers = [(b"content-type", b"application/json")]
            if res.etag is not None:
                headers.append((b"etag", res.etag.encode()))
            for k, v in res.metadata.items():
                headers.append((b"metadata." + k.encode(), v.encode()))
            return Response(200, headers, res.data)
        if req.method == "DELETE":
            etag = req.header(b"if-match")
            await self.state.delete(
                store,
                key,
                etag=etag.decode("latin-1") if etag else None,
                concurrency=codec.concurrency(q.get("concurrency")),
                consistency=codec.consistency(q.get("consistency")),
                metadata=md,
            )
            return codec.no_content()
        raise _method_not_allowed(req)


class _Unauthorized(PillionError):
    def __init__(self) -> None:
        super().__init__("ERR_UNAUTHORIZED", "invalid api token", 401, GrpcCode.UNAUTHENTICATED)


_HEALTH = "/v1.0/healthz"


# (method, path, status, dapr-app-id header) -> (span name, attributes): the same routes recur,
# so most API spans share a name and one attributes dict (which nothing changes once set).
_API_SPANS: dict[tuple[str, str, int, bytes | None], tuple[str, SharedAttributes]] = {}
_API_SPANS_MAX = 4096


def _api_span_shape(
    method: str, path: str, status: int, app: bytes | None
) -> tuple[str, SharedAttributes]:
    """daprd's attributes, and its name for invocation: CallLocal/{appId}/{method}."""
    name = path
    attributes = SharedAttributes(
        {"dapr.api": f"{method} {path}", "dapr.protocol": "http", "dapr.status_code": status}
    )
    if path.startswith("/v1.0/invoke/"):
        app_id, _, rest = path[13:].partition("/")
        target = rest[7:] if rest.startswith("method/") else rest
        name = f"CallLocal/{unquote(app_id)}/{target}"
        attributes["dapr.invoke_method"] = target
    elif app is not None:
        name = f"CallLocal/{app.decode('utf-8', 'replace')}{path}"
        attributes["dapr.invoke_method"] = path[1:]
    return name, attributes


def _end_api_span(span: Span, req: Request, resp: Response) -> None:
    status = resp.status
    key = (req.method, req.path, status, req.header(b"dapr-app-id"))
    shape = _API_SPANS.get(key)
    if shape is None:
        shape = _api_span_shape(*key)
        if len(_API_SPANS) < _API_SPANS_MAX:
            _API_SPANS[key] = shape
    span.name, span.attributes = shape
    span.end(f"status {status}" if status >= 400 else None)


def _trace_headers(req: Request) -> dict[str, str]:
    tp = req.header(b"traceparent")
    ts = req.header(b"tracestate")
    return {
        "traceparent": tp.decode("latin-1") if tp else "",
        "tracestate": ts.decode("latin-1") if ts else "",
    }


def _query(req: Request) -> dict[str, str]:
    if not req.query:
        return {}
    out: dict[str, str] = {}
    for k, v in parse_qsl(req.query.decode("latin-1"), keep_blank_values=True):
        out.setdefault(k, v)  # first value only, as Dapr
    return out


def _allow(req: Request, *methods: str) -> None:
    if req.method not in methods:
        raise _method_not_allowed(req)


def _method_not_allowed(req: Request) -> PillionError:
    return PillionError(
        Code.BAD_REQUEST,
        f"method {req.method} is not allowed on {req.path}",
        405,
        GrpcCode.UNIMPLEMENTED,
    )


def _not_found(req: Request) -> PillionError:
    return PillionError(
        Code.BAD_REQUEST, f"no API route for {req.method} {req.path}", 404, GrpcCode.NOT_FOUND
    )


def _basic_auth_app_id(req: Request) -> str:
    """App id from `Authorization: Basic base64("dapr-app-id:<id>")`."""
    auth = req.header(b"authorization")
    if not auth or auth[:6].lower() != b"basic ":
        return ""
    try:
        user, _, pw = base64.b64decode(auth[6:].strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return pw if user.lower() == "dapr-app-id" else ""


Handler = Callable[[Request], Awaitable[Response]]
