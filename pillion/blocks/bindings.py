"""The bindings building block: output binding invocation and input event delivery to the app."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pillion.blocks.guard import component_call, recorder
from pillion.components.bindings.api import (
    BindingError,
    BindingResponse,
    InputBinding,
    InputHandler,
    OutputBinding,
)
from pillion.errors import Code, GrpcCode, PillionError
from pillion.observability.tracing import CONSUMER, start_with_carrier
from pillion.resiliency import CircuitOpen

if TYPE_CHECKING:
    from pillion.observability.dapr_metrics import DaprMetrics
    from pillion.observability.tracing import Tracer
    from pillion.resiliency import Resiliency

log = logging.getLogger("pillion.blocks.bindings")


@dataclass
class BindingEntry:
    """One loaded binding component and the directions it serves."""

    name: str
    component: InputBinding | OutputBinding
    input: bool
    output: bool
    route: str = ""

    def capabilities(self) -> list[str]:
        """What `GET /v1.0/metadata` lists for it, as daprd does."""
        caps = []
        if self.input:
            caps.append("INPUT_BINDING")
        if self.output:
            caps.append("OUTPUT_BINDING")
        return caps


class BindingDeliverer(Protocol):
    """The app side of input bindings, implemented by the runtime for HTTP and gRPC apps."""

    async def accepts(self, entry: BindingEntry) -> bool:
        """Whether the app takes events of this binding (OPTIONS probe / ListInputBindings)."""

    async def deliver(self, entry: BindingEntry, data: bytes, metadata: Mapping[str, str]) -> bytes:
        """Hand one event to the app; raise when the app did not accept it."""


class BindingsBlock:
    """Every bindings API rule lives here, once, for HTTP and gRPC alike."""

    def __init__(self, app_id: str, bindings: Mapping[str, BindingEntry]) -> None:
        self.app_id = app_id
        self.bindings = dict(bindings)
        self._reading: list[InputBinding] = []
        # Set by the runtime: component metrics, resiliency policies, the tracer.
        self.metrics: DaprMetrics | None = None
        self.resiliency: Resiliency | None = None
        self.tracer: Tracer | None = None

    async def invoke(
        self, name: str, operation: str, data: bytes, metadata: Mapping[str, str]
    ) -> BindingResponse:
        entry = self.bindings.get(name)
        if entry is None or not entry.output or not isinstance(entry.component, OutputBinding):
            raise _invoke_error(name, f"couldn't find output binding {name}")
        comp = entry.component
        ops = comp.operations()
        if operation not in ops:
            raise _invoke_error(
                name,
                f"binding {name} does not support operation {operation}. "
                f"supported operations:{' '.join(ops)}",
            )
        record = recorder(self.metrics, "output_binding", name, operation)
        try:
            return await component_call(
                self.resiliency,
                name,
                "bindings",
                lambda: comp.invoke(operation, data, metadata),
                record=record,
                retryable=lambda exc: not isinstance(exc, ValueError),
            )
        except TimeoutError as exc:
            raise _invoke_error(name, "context deadline exceeded") from exc
        except (BindingError, ValueError, OSError, CircuitOpen) as exc:
            raise _invoke_error(name, str(exc)) from exc

    async def start_inputs(self, deliverer: BindingDeliverer) -> list[str]:
        """Start reading every input binding the app takes; the names started."""
        started: list[str] = []
        for entry in self.bindings.values():
            comp = entry.component
            if not entry.input or not isinstance(comp, InputBinding) or comp in self._reading:
                continue
            try:
                if not await deliverer.accepts(entry):
                    log.info("app does not take events of input binding %s", entry.name)
                    continue
                await comp.read(self._handler(deliverer, entry))
            except Exception as exc:
                log.error("input binding %s could not start: %s", entry.name, exc)
                continue
            self._reading.append(comp)
            started.append(entry.name)
            log.info("input binding %s is reading", entry.name)
        return started

    def _handler(self, deliverer: BindingDeliverer, entry: BindingEntry) -> InputHandler:
        """Deliveries of one input binding, under its inbound resiliency policy, counted."""
        record = recorder(self.metrics, "input_binding", entry.name)

        async def handle(data: bytes, metadata: Mapping[str, str]) -> bytes:
            tracer = self.tracer
            span = None
            if tracer is not None and tracer.enabled:
                # The event starts a trace (or continues one its metadata carries); the app
                # gets the delivery span's context like any traced call.
                span, context = start_with_carrier(
                    tracer, f"bindings/{entry.name}", metadata, CONSUMER
                )
                if context:
                    metadata = {**metadata, **context}
            error: str | None = "failed"
            try:
                out = await component_call(
                    self.resiliency,
                    entry.name,
                    "bindings",
                    lambda: deliverer.deliver(entry, data, metadata),
                    record=record,
                    inbound=True,
                )
                error = None
                return out
            finally:
                if span is not None:
                    span.attributes = {"db.system": "bindings", "db.name": entry.name}
                    span.end(error)

        return handle

    async def stop(self) -> None:
        """Stop every input binding started; the components close again harmlessly later."""
        reading, self._reading = self._reading, []
        for comp in reading:
            try:
                await comp.close()
            except Exception:
                log.exception("error stopping an input binding")


def _invoke_error(name: str, detail: str) -> PillionError:
    return PillionError(
        Code.INVOKE_OUTPUT_BINDING,
        f"error invoking output binding {name}: {detail}",
        500,
        GrpcCode.INTERNAL,
    )
