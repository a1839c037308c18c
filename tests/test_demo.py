"""The demo shows the bug without ctxrelay and every hop relayed with it."""

from __future__ import annotations

import subprocess
import sys

from ctxrelay.demo import Hop, main


def test_demo_exits_zero_and_shows_lost_then_relayed_hops() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ctxrelay.demo"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    plain, instrumented, explicit = result.stdout.split("\n\n")[1:4]
    assert plain.count("LOST") == 3  # both lookups and the audit thread
    assert "LOST" not in instrumented
    assert instrumented.count("req-7f3a") == 4
    assert "LOST" not in explicit
    assert explicit.count("req-7f3a") == 4
    assert "every hop saw its request" in result.stdout


def test_demo_main_returns_zero_in_process() -> None:
    assert main() == 0


def test_hop_is_complete_only_with_every_field() -> None:
    assert Hop("t", "th", "r", "u", "c").complete
    assert not Hop("t", "th", "r", None, "c").complete
