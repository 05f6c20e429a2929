"""The demo as a test: two apps under two `pillion run`, the official SDK invoking by app id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PILLION_HOME": str(tmp_path / "home")},
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for line in [
        "You're up and running! Both Dapr and your app logs will appear here.",
        "[order-processor] == APP == received order 5 from checkout: plant",
        "[checkout] == APP == order 3 read back from state: kettle",
        "[checkout] == APP == order-processor has 5 orders in its state store",
        "[checkout] == APP == order-processor received 5 shipment events",
        "  pub/sub checkout -> order-processor (5 events): yes",
        "[checkout] ✅  Exited App successfully",
        "[checkout] ✅  Exited Dapr successfully",
        "[order-processor] ✅  Exited Dapr successfully",
        "  result: OK",
    ]:
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "Traceback" not in out
