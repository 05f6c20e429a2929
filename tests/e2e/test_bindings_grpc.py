"""Input bindings to a gRPC app: ListInputBindings, then OnBindingEvent per cron tick."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pillion.testing.procs import Proc, free_port, start_sidecar, wait_until
from tests.e2e.conftest import APPS


def test_cron_ticks_reach_a_grpc_app(tmp_path: Path, home: Path) -> None:
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "ticker.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: ticker\nspec:\n"
        "  type: bindings.cron\n  version: v1\n  metadata:\n  - name: schedule\n"
        '    value: "@every 1s"\n'
    )
    events = tmp_path / "events.jsonl"
    port = free_port()
    app = Proc.start(
        "grpc binding app",
        [sys.executable, str(APPS / "grpc_binding_app.py"), str(port)],
        env={**os.environ, "EVENTS_FILE": str(events)},
    )
    procs = [app]
    try:
        app.wait_for_line("listening", 15)
        sc = start_sidecar(
            "gticker",
            home=home,
            resources=[tmp_path / "res"],
            app_port=port,
            extra=["--app-protocol", "grpc"],
            wait="ready",
            timeout=30,
        )
        procs.append(sc.proc)

        def ticks() -> list[dict[str, object]]:
            if not events.exists():
                return []
            return [json.loads(line) for line in events.read_text().splitlines() if line]

        wait_until(lambda: len(ticks()) >= 2, 15, "two cron ticks at the gRPC app")
        assert all("readTimeUTC" in t["metadata"] for t in ticks())  # type: ignore[operator]
    finally:
        for p in reversed(procs):
            p.stop()
