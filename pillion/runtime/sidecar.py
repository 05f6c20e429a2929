"""The sidecar process: wires manifests, components, blocks and servers, and runs the lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from urllib.parse import quote

import grpc

from pillion import __version__
from pillion.api.grpc.dapr_api import DaprApi
from pillion.api.grpc.proxy import GrpcProxy
from pillion.api.grpc.server import start_grpc_server
from pillion.api.http import codec
from pillion.api.http.router import HttpApi
from pillion.blocks.bindings import BindingsBlock
from pillion.blocks.configuration import AppSink as ConfigUpdateSink
from pillion.blocks.configuration import ConfigurationBlock
from pillion.blocks.health import Health
from pillion.blocks.invoke import (
    GRPC_MESSAGE_HEADER,
    GRPC_STATUS_HEADER,
    InvokeBlock,
    encode_grpc_message,
)
from pillion.blocks.lock import LockBlock
from pillion.blocks.metadata import AppConnection, MetadataBlock
from pillion.blocks.outbox import Outbox
from pillion.blocks.pubsub import PubSubBlock
from pillion.blocks.secrets import ScopeConfigError, SecretsBlock, SecretScope, parse_scopes
from pillion.blocks.state import StateBlock
from pillion.components.configuration.api import ConfigurationItem
from pillion.components.pubsub.api import PubSubError
from pillion.coordination.local import LocalBackend
from pillion.coordination.names import NameResolver, register
from pillion.errors import GRPC_NUMBERS, PillionError
from pillion.home import pillion_home, registry_file
from pillion.manifests.loader import ManifestError, load_configuration, load_resources
from pillion.manifests.model import Configuration
from pillion.observability.metrics_server import handler as metrics_handler
from pillion.runtime import logs
from pillion.runtime.bindings import GrpcBindingDeliverer, HttpBindingDeliverer
from pillion.runtime.channels import HttpAppChannel, SidecarLink
from pillion.runtime.components import ComponentInitError, Loaded, load_components
from pillion.runtime.grpc_app import GrpcAppChannel
from pillion.runtime.grpc_pubsub import GrpcDeliverer, discover_grpc
from pillion.runtime.options import SidecarOptions, build_parser, options_from_args
from pillion.runtime.subscriptions import HttpDeliverer, discover_http, from_manifests
from pillion.runtime.telemetry import Telemetry, build_telemetry
from pillion.transport.http import Request, Response
from pillion.transport.server import HttpServer

log = logging.getLogger("pillion.runtime.sidecar")


class Sidecar:
    """One sidecar's objects and its start -> serve -> drain sequence (DESIGN.md §6)."""

    def __init__(self, opts: SidecarOptions) -> None:
        self.opts = opts
        self.health = Health(opts.app_id)
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._tasks: list[asyncio.Task[None]] = []
        self.loaded = Loaded()
        self.http_port = 0
        self.internal_port = 0
        self.grpc_port = 0
        self.metrics_port = 0

    def request_shutdown(self, reason: str = "shutdown API called") -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    async def run(self) -> int:
        t0 = time.monotonic()
        opts = self.opts
        loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupt")):
            loop.add_signal_handler(sig, self.request_shutdown, f"signal '{name}'")
        log.info("Starting Dapr Runtime -- version %s (pillion)", __version__)
        log.info("Log level set to: %s", opts.log_level)

        try:
            resources = load_resources(
                opts.resources_paths,
                app_id=opts.app_id,
                namespace=opts.namespace,
                env=os.environ,
            )
            api_logging = opts.enable_api_logging
            omit_health = False
            secret_scopes: dict[str, SecretScope] = {}
            config: Configuration | None = None
            if opts.config_files:
                config = load_configuration(opts.config_files)
                log.info("Loaded configuration: %s", config.name or ", ".join(opts.config_files))
                api_logging = api_logging or config.api_logging
                omit_health = config.api_logging_omit_health_checks
                try:
                    secret_scopes = parse_scopes(config.spec)
                except ScopeConfigError as exc:
                    raise ManifestError(config.source, None, None, str(exc)) from exc
            telemetry = build_telemetry(
                app_id=opts.app_id,
                namespace=opts.namespace,
                config=config,
                resources=resources,
                enable_metrics=opts.enable_metrics,
            )
        except ManifestError as exc:
            log.critical("Fatal error from runtime: %s", exc)
            return 1

        home = pillion_home(opts.home)
        backend = LocalBackend(registry_file(home))
        resolver = NameResolver(backend)
        link = SidecarLink()
        app_token = os.environ.get("APP_API_TOKEN") or None
        api_token = os.environ.get("DAPR_API_TOKEN") or None
        app: AppChannel | None = None
        if opts.app_port:
            if opts.app_protocol == "h2c":
                log.critical("Fatal error from runtime: --app-protocol h2c is not supported yet")
                return 1
            app = _app_channel(opts, app_token)
        self.invoke = InvokeBlock(opts.app_id, opts.namespace, resolver, link, app)
        # keyPrefix "namespace" falls back to the app id when NAMESPACE is unset.
        self.state = StateBlock(opts.app_id, os.environ.get("NAMESPACE", ""), {})
        self.pubsub = PubSubBlock(opts.app_id, {})
        self.lock = LockBlock(opts.app_id, {})
        self.secrets = SecretsBlock(opts.app_id, {}, secret_scopes)
        self.bindings = BindingsBlock(opts.app_id, {})
        self.configuration = ConfigurationBlock(
            opts.app_id, {}, _config_sink(app) if isinstance(app, HttpAppChannel) else None
        )
        self.resources = resources
        self._wire(telemetry, app)
        meta = MetadataBlock(
            opts.app_id,
            lambda: list(self.loaded.views),
            AppConnection(
                opts.app_port,
                opts.app_protocol,
                opts.app_channel_address,
                opts.app_max_concurrency,
                opts.app_health_check_path if opts.enable_app_health_check else "",
                opts.app_health_probe_interval,
                opts.app_health_probe_timeout,
                opts.app_health_threshold,
            ),
        )
        meta.subscriptions = lambda: [s.view() for s in self.pubsub.subscriptions()]
        api = HttpApi.with_env(
            app_id=opts.app_id,
            health=self.health,
            state=self.state,
            invoke=self.invoke,
            metadata=meta,
            request_shutdown=self.request_shutdown,
            api_logging=api_logging,
            pubsub=self.pubsub,
            lock=self.lock,
            secrets=self.secrets,
            bindings=self.bindings,
            configuration=self.configuration,
        )
        api.tracer = telemetry.tracer
        api.metrics = telemetry.metrics
        api.omit_health_checks = omit_health
        api_server = HttpServer(api, max_body_size=opts.max_body_size)
        metrics_server = (
            HttpServer(metrics_handler(telemetry.metrics))
            if telemetry.metrics is not None
            else None
        )
        internal_server = HttpServer(self._internal, max_body_size=opts.max_body_size)
        dapr_api = DaprApi(
            state=self.state,
            invoke=self.invoke,
            metadata=meta,
            request_shutdown=self.request_shutdown,
            app_id=opts.app_id,
            pubsub=self.pubsub,
            lock=self.lock,
            secrets=self.secrets,
            bindings=self.bindings,
            configuration=self.configuration,
        )
        proxy = GrpcProxy(
            app_id=opts.app_id,
            namespace=opts.namespace,
            resolver=resolver,
            local_app=app.open_channel if isinstance(app, GrpcAppChannel) else lambda: None,
            max_message_size=opts.max_body_size,
            app_token=app_token,
            peer_token=api_token,
        )
        grpc_server: grpc.aio.Server | None = None
        session = None
        try:
            try:
                for addr in opts.listen_addresses:
                    self.http_port = await api_server.start(addr, opts.http_port)
                self.internal_port = await internal_server.start(
                    opts.listen_addresses[0], opts.internal_port
                )
                grpc_server, self.grpc_port = await start_grpc_server(
                    dapr_api,
                    host=list(opts.listen_addresses),
                    port=opts.grpc_port,
                    max_message_size=opts.max_body_size,
                    api_token=api_token,
                    generic_handlers=[proxy],
                    tracer=telemetry.tracer,
                    metrics=telemetry.metrics,
                    api_logging=api_logging,
                )
            except OSError as exc:
                log.critical("Fatal error from runtime: failed to start servers: %s", exc)
                return 1
            log.info("HTTP server is running on port %d", self.http_port)
            log.info("gRPC server is running on port %d", self.grpc_port)
            log.info("Internal server (sidecar link) is running on port %d", self.internal_port)
            if metrics_server is not None:
                try:
                    self.metrics_port = await metrics_server.start(
                        opts.listen_addresses[0], opts.metrics_port
                    )
                    log.info("metrics server started on :%d/", self.metrics_port)
                except OSError as exc:
                    # daprd treats this as fatal too: a second sidecar on the default 9090.
                    log.critical(
                        "Fatal error from runtime: failed to start metrics server on port %d: %s",
                        opts.metrics_port,
                        exc,
                    )
                    return 1
            if telemetry.tracer is not None:
                self._tasks.append(asyncio.create_task(telemetry.tracer.run()))
            self.invoke.own_address = f"{opts.listen_addresses[0]}:{self.internal_port}"

            try:
                self.loaded = await load_components(
                    resources.components, app_id=opts.app_id, namespace=opts.namespace
                )
            except ComponentInitError as exc:
                log.critical("Fatal error from runtime: process component error: %s", exc)
                return 1
            self.state.stores = dict(self.loaded.state)
            if telemetry.metrics is not None:
                telemetry.metrics.component_loaded(len(self.loaded.views))
                for view in self.loaded.views:
                    telemetry.metrics.component_init(view.type)
            self.pubsub.pubsubs = dict(self.loaded.pubsub)
            try:  # the transactional outboxes' internal subscriptions (not the app's)
                await Outbox(self.state, self.pubsub).start()
            except (PillionError, PubSubError) as exc:
                log.critical("Fatal error from runtime: outbox: %s", exc)
                return 1
            self.lock.stores = dict(self.loaded.lock)
            self.secrets.stores = dict(self.loaded.secretstores)
            self.bindings.bindings = dict(self.loaded.bindings)
            self.configuration.stores = dict(self.loaded.configuration)

            await backend.start()
            await resolver.start()
            if opts.app_id:
                session = await register(
                    backend,
                    app_id=opts.app_id,
                    namespace=opts.namespace,
                    address=f"{opts.listen_addresses[0]}:{self.internal_port}",
                    grpc_address=f"{opts.listen_addresses[0]}:{self.grpc_port}",
                    host=socket.gethostname(),
                )
            self.health.outbound_ready = True
            log.info("Outbound ready in %dms", (time.monotonic() - t0) * 1000)

            self._tasks.append(asyncio.create_task(self._await_app(app, t0)))
            await self._stop.wait()
            log.info("Received %s; beginning shutdown", self._stop_reason)
            log.info("Dapr shutting down")
            self.health.ready = False
            if session is not None:
                await session.close()
                session = None
            # Stop consuming first: in-flight deliveries finish while the app is still up, and
            # what was not acknowledged stays with the broker.
            await self.pubsub.stop()
            await self.bindings.stop()
            api_server.stop_accepting()
            internal_server.stop_accepting()
            grace = opts.graceful_shutdown_seconds
            await asyncio.gather(
                api_server.close(grace),
                internal_server.close(grace),
                grpc_server.stop(grace),
            )
            if telemetry.tracer is not None:
                await telemetry.tracer.close()  # what is still queued goes out before exit
            return 0
        finally:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(BaseException):
                    await t
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()
            await api_server.close(0)
            await internal_server.close(0)
            if metrics_server is not None:
                await metrics_server.close(0)
            if grpc_server is not None:
                await grpc_server.stop(0)
            await proxy.close()
            await self.pubsub.stop()
            await self.bindings.stop()
            await self.configuration.close()
            await self.loaded.close()
            await resolver.close()
            await backend.close()
            await link.close()
            if app is not None:
                await app.close()
            log.info("Dapr runtime stopped")

    def _wire(self, telemetry: Telemetry, app: AppChannel | None) -> None:
        """Hand the tracer, metrics and resiliency policies to every block that uses them."""
        t = telemetry
        self.invoke.tracer = t.tracer
        self.invoke.metrics = t.metrics
        self.invoke.resiliency = t.resiliency
        self.pubsub.tracer = t.tracer
        self.pubsub.metrics = t.metrics
        self.pubsub.resiliency = t.resiliency
        self.state.metrics = t.metrics
        self.state.resiliency = t.resiliency
        self.bindings.metrics = t.metrics
        self.bindings.resiliency = t.resiliency
        self.bindings.tracer = t.tracer
        self.secrets.metrics = t.metrics
        self.secrets.resiliency = t.resiliency
        self.configuration.metrics = t.metrics
        self.configuration.resiliency = t.resiliency
        self.lock.resiliency = t.resiliency
        if app is not None:
            app.metrics = t.metrics

    async def _internal(self, req: Request) -> Response:
        target = req.path.encode("latin-1")
        if req.query:
            target += b"?" + req.query
        try:
            r = await self.invoke.on_remote_call(req.method, target, req.headers, req.body)
        except PillionError as err:
            # The caller sidecar may be serving a gRPC client: give it the exact status too.
            resp = codec.error(err)
            resp.headers = [
                *resp.headers,
                (GRPC_STATUS_HEADER, str(GRPC_NUMBERS[err.grpc_code]).encode()),
                (GRPC_MESSAGE_HEADER, encode_grpc_message(err.message)),
            ]
            return resp
        return Response(r.status, r.headers, r.body, r.reason)

    async def _await_app(self, app: AppChannel | None, t0: float) -> None:
        opts = self.opts
        if app is not None:
            log.info("Waiting for the app on port %d", opts.app_port)
            await app.wait_ready()
            if isinstance(app, GrpcAppChannel):
                await app.get_channel()
            await self._start_subscriptions(app)
            await self._start_bindings(app)
            log.info("Application discovered on port %d", opts.app_port)
            if opts.enable_app_health_check:
                self._tasks.append(asyncio.create_task(self._probe_app(app)))
        self.health.ready = True
        self.health.waiting_for = []
        log.info(
            "dapr initialized. Status: Running. Init Elapsed %dms", (time.monotonic() - t0) * 1000
        )
        _settle_gc()

    async def _start_subscriptions(self, app: AppChannel) -> None:
        """Declarative and programmatic subscriptions, once the app is reachable (§12.4)."""
        if not self.pubsub.pubsubs:
            return
        grpc_app = isinstance(app, GrpcAppChannel)
        specs = from_manifests(self.resources.subscriptions, leading_slash=not grpc_app)
        discover = "subscribe" not in self.opts.disable_init_endpoints
        deliverer: HttpDeliverer | GrpcDeliverer
        if isinstance(app, GrpcAppChannel):
            if discover:
                specs += await discover_grpc(app)
            deliverer = GrpcDeliverer(app)
        else:
            if discover:
                specs += await discover_http(app, self.opts.app_id)
            deliverer = HttpDeliverer(app)
        for spec in specs:
            try:
                await self.pubsub.subscribe(spec, deliverer)
            except PubSubError as exc:
                log.error("subscription to %s/%s failed: %s", spec.pubsub, spec.topic, exc)

    async def _start_bindings(self, app: AppChannel) -> None:
        """Input bindings the app takes start reading once it is reachable (§4.2)."""
        if not any(b.input for b in self.bindings.bindings.values()):
            return
        if isinstance(app, GrpcAppChannel):
            await self.bindings.start_inputs(GrpcBindingDeliverer(app))
        else:
            await self.bindings.start_inputs(HttpBindingDeliverer(app))

    async def _probe_app(self, app: AppChannel) -> None:
        opts = self.opts
        failures = 0
        while True:
            ok = await app.probe(opts.app_health_check_path, opts.app_health_probe_timeout)
            if ok:
                failures = 0
                if not app.healthy:
                    log.info("App entered healthy status")
                    app.healthy = True
                    await self._start_subscriptions(app)  # consume again, as daprd does
            else:
                failures += 1
                if failures >= opts.app_health_threshold and app.healthy:
                    log.warning("App entered un-healthy status")
                    app.healthy = False
                    # No deliveries to an unhealthy app: what was not acknowledged stays queued.
                    await self.pubsub.stop(app_only=True)
            await asyncio.sleep(opts.app_health_probe_interval)


AppChannel = HttpAppChannel | GrpcAppChannel


def _config_sink(app: HttpAppChannel) -> ConfigUpdateSink:
    """POST each changed key to the app at /configuration/{store}/{key} (dapr-api.md §7)."""

    async def sink(store: str, sub_id: str, items: dict[str, ConfigurationItem]) -> None:
        for key, item in items.items():
            body = json.dumps(
                {
                    "id": sub_id,
                    "items": {
                        key: {
                            "value": item.value,
                            "version": item.version,
                            "metadata": item.metadata,
                        }
                    },
                }
            ).encode()
            target = f"/configuration/{quote(store, safe='')}/{quote(key, safe='')}".encode()
            r = await app.invoke("POST", target, [(b"content-type", b"application/json")], body)
            if r.status != 200:
                log.warning(
                    "configuration update %s for key %s: the app answered %d", sub_id, key, r.status
                )

    return sink


def _app_channel(opts: SidecarOptions, app_token: str | None) -> AppChannel:
    """The channel to the app for --app-protocol http|https|grpc|grpcs."""
    if opts.app_protocol in ("grpc", "grpcs"):
        return GrpcAppChannel(
            opts.app_channel_address,
            opts.app_port,
            tls=opts.app_protocol == "grpcs",
            max_concurrency=opts.app_max_concurrency,
            app_token=app_token,
            max_message_size=opts.max_body_size,
        )
    return HttpAppChannel(
        opts.app_channel_address,
        opts.app_port,
        tls=opts.app_protocol == "https",
        max_concurrency=opts.app_max_concurrency,
        app_token=app_token,
    )


# Young objects the cyclic collector may see before it runs (CPython's default is 700).
GC_THRESHOLD = 10_000


def _settle_gc() -> None:
    """Once started: what start-up built (modules, protobuf descriptors, manifests) lives as long
    as the process, so the collector stops walking it (gc.freeze), and it runs less often.
    Requests make little cyclic garbage; with CPython's defaults, spans waiting for export were
    walked and promoted again and again (about 1.7 µs a traced request, measured)."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    opts = options_from_args(ns, namespace=os.environ.get("NAMESPACE") or "default")
    logs.setup(opts.app_id, opts.log_level, opts.log_as_json)
    try:
        import uvloop

        return uvloop.run(Sidecar(opts).run())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(Sidecar(opts).run())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
