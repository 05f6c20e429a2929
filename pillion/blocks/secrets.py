"""The secrets building block: store lookup, secret scopes and error mapping."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pillion.blocks.guard import component_call, recorder
from pillion.components.secretstores.api import SecretStore, SecretStoreError
from pillion.errors import Code, GrpcCode, PillionError
from pillion.resiliency import CircuitOpen

if TYPE_CHECKING:
    from pillion.observability.dapr_metrics import DaprMetrics
    from pillion.resiliency import Resiliency

ALLOW = "allow"
DENY = "deny"


@dataclass(frozen=True)
class SecretScope:
    """One `spec.secrets.scopes[]` entry of the Configuration (dapr-api.md §6)."""

    store: str
    default_access: str = ALLOW
    allowed: frozenset[str] = frozenset()
    denied: frozenset[str] = frozenset()

    def allows(self, key: str) -> bool:
        """Dapr's IsSecretAllowed: a non-empty allow list alone decides, then the deny list,
        then defaultAccess."""
        if self.allowed:
            return key in self.allowed
        if key in self.denied:
            return False
        return self.default_access == ALLOW


class ScopeConfigError(ValueError):
    """`spec.secrets` of a Configuration is malformed; `field` is the path inside `spec`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"spec.{field}: {message}")
        self.field = field


def parse_scopes(spec: Mapping[str, Any]) -> dict[str, SecretScope]:
    """Store name -> scope from a Configuration's `spec`; validated as daprd does at load."""
    secrets = spec.get("secrets")
    if secrets is None:
        return {}
    if not isinstance(secrets, Mapping):
        raise ScopeConfigError("secrets", "must be a mapping with a `scopes` list")
    raw = secrets.get("scopes")
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ScopeConfigError("secrets.scopes", "must be a list")
    out: dict[str, SecretScope] = {}
    for i, item in enumerate(raw):
        where = f"secrets.scopes[{i}]"
        if not isinstance(item, Mapping):
            raise ScopeConfigError(where, "must be a mapping")
        store = item.get("storeName")
        if not isinstance(store, str) or not store:
            raise ScopeConfigError(f"{where}.storeName", "is required")
        if store in out:
            raise ScopeConfigError(
                f"{where}.storeName", f"{store!r} is repeated in secrets configuration"
            )
        access = item.get("defaultAccess") or ALLOW
        if not isinstance(access, str) or access.lower() not in (ALLOW, DENY):
            raise ScopeConfigError(
                f"{where}.defaultAccess", f"must be allow or deny, got {access!r}"
            )
        out[store] = SecretScope(
            store,
            access.lower(),
            _names(item.get("allowedSecrets"), f"{where}.allowedSecrets"),
            _names(item.get("deniedSecrets"), f"{where}.deniedSecrets"),
        )
    return out


def _names(value: Any, field: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ScopeConfigError(field, "must be a list of secret names")
    return frozenset(value)


class SecretsBlock:
    """Every secrets API rule lives here, once, for HTTP and gRPC alike."""

    def __init__(
        self,
        app_id: str,
        stores: Mapping[str, SecretStore],
        scopes: Mapping[str, SecretScope] | None = None,
    ) -> None:
        self.app_id = app_id
        self.stores = dict(stores)
        self.scopes = dict(scopes or {})
        # Set by the runtime: component metrics and outbound resiliency policies.
        self.metrics: DaprMetrics | None = None
        self.resiliency: Resiliency | None = None

    def store(self, name: str) -> SecretStore:
        if not self.stores:
            raise PillionError(
                Code.SECRET_STORES_NOT_CONFIGURED,
                "secret store is not configured",
                500,
                GrpcCode.FAILED_PRECONDITION,
            )
        s = self.stores.get(name)
        if s is None:
            # 401 is Dapr's status for this error, odd as it is.
            raise PillionError(
                Code.SECRET_STORE_NOT_FOUND,
                f"failed finding secret store with key {name}",
                401,
                GrpcCode.INVALID_ARGUMENT,
            )
        return s

    def allowed(self, store: str, key: str) -> bool:
        """Stores without a scope entry allow every secret."""
        scope = self.scopes.get(store)
        return scope is None or scope.allows(key)

    async def _call(self, store: str, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        record = recorder(self.metrics, "secret", store, operation)
        return await component_call(
            self.resiliency, store, "secretstores", fn, record=record, retryable=_retryable
        )

    async def get(
        self, store: str, key: str, metadata: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        s = self.store(store)
        if not self.allowed(store, key):
            raise PillionError(
                Code.PERMISSION_DENIED,
                f"access denied by policy to get {_quote(key)} from {_quote(store)}",
                403,
                GrpcCode.PERMISSION_DENIED,
            )
        try:
            return dict(await self._call(store, "get", lambda: s.get(key, metadata or {})))
        except (SecretStoreError, ValueError, OSError, TimeoutError, CircuitOpen) as exc:
            raise PillionError(
                Code.SECRET_GET,
                f"failed getting secret with key {key} from secret store {store}: {exc}",
                500,
                GrpcCode.INTERNAL,
            ) from exc

    async def bulk(
        self, store: str, metadata: Mapping[str, str] | None = None
    ) -> dict[str, dict[str, str]]:
        """Every secret of the store this app may read; denied ones are left out silently."""
        s = self.store(store)
        try:
            data = await self._call(store, "bulk_get", lambda: s.bulk_get(metadata or {}))
        except (SecretStoreError, ValueError, OSError, TimeoutError, CircuitOpen) as exc:
            raise PillionError(
                Code.SECRET_GET,
                f"failed getting secrets from secret store {store}: {exc}",
                500,
                GrpcCode.INTERNAL,
            ) from exc
        return {name: dict(v) for name, v in data.items() if self.allowed(store, name)}


T = TypeVar("T")


def _retryable(exc: BaseException) -> bool:
    """A bad request fails the same way again; store errors may not."""
    return not isinstance(exc, ValueError)


def _quote(s: str) -> str:
    """Go's %q for the texts Dapr formats with it."""
    return json.dumps(s, ensure_ascii=False)
