"""Dapr's `{uuid}`, `{appID}`, `{namespace}`, `{podName}` placeholders and `$VAR` expansion."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

UUID = "{uuid}"
APP_ID = "{appID}"
NAMESPACE = "{namespace}"
POD_NAME = "{podName}"


class PlaceholderError(ValueError):
    """A placeholder cannot be expanded (today only `{podName}` without POD_NAME)."""


def expand(value: str, *, app_id: str, namespace: str, env: Mapping[str, str]) -> str:
    """`value` with every placeholder replaced, as daprd does for component metadata.

    `{uuid}` gets a fresh UUID per occurrence (so two in one value differ); `{namespace}` is
    `namespace.appID` even when the namespace is empty, exactly like daprd.
    """
    if "{" not in value:
        return value
    while UUID in value:
        value = value.replace(UUID, str(uuid.uuid4()), 1)
    if POD_NAME in value:
        pod = env.get("POD_NAME", "")
        if not pod:
            raise PlaceholderError(
                f"{POD_NAME} is used but the POD_NAME environment variable is not set"
            )
        value = value.replace(POD_NAME, pod)
    value = value.replace(NAMESPACE, f"{namespace}.{app_id}")
    return value.replace(APP_ID, app_id)


# os.ExpandEnv's grammar: ${anything}, $name, or one shell-special character ($1, $$, $?).
_ENV_REF = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*)|([0-9*#$@!?-]))")


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """`text` with `$NAME` and `${NAME}` replaced from `env` (unset -> ""), like Go's os.ExpandEnv.

    daprd runs this over standalone `--config` files before parsing them, so configurations
    written for it (e.g. `endpointAddress: ${OTEL_ENDPOINT}`) must see the same expansion.
    A `$` not followed by a name is left alone.
    """
    if "$" not in text:
        return text

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) if m.group(1) is not None else (m.group(2) or m.group(3))
        return env.get(name, "")

    return _ENV_REF.sub(sub, text)
