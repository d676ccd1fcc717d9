"""``apt-plugins report``: the fast in-process invariant report (no lerobot-train)."""

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_report_checks_every_claim_for_every_adapter():
    proc = subprocess.run([str(BIN / "apt-plugins"), "report", "--steps", "2", "--adapter", "lerobot_pi0",
                           "--adapter", "lerobot_pi05"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "12/12 claims hold" in proc.stdout
    for claim in ("Stage 1 ignores the instruction", "Stage 2 at step 0 equals Stage 1",
                  "frozen tensors bit-identical after Stage 2", "only the fusion layers are new"):
        assert proc.stdout.count(f"[PASS] {claim}") == 2, claim
