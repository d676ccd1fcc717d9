"""``import apt_plugins`` is cheap: no torch, lerobot or deepspeed, and fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("torch", "lerobot", "deepspeed", "transformers", "peft")


def _run(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APT_PLUGINS_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_does_not_pull_heavy_dependencies():
    result = _run(
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import apt_plugins\n"
        "dt = time.perf_counter() - t\n"
        f"print(json.dumps({{'seconds': dt, 'loaded': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n"
    )
    assert result["loaded"] == []
    assert result["seconds"] < 1.5, f"import apt_plugins took {result['seconds']:.2f} s"


def test_plugin_discovery_and_errors_stay_light():
    """Loading every plugin, the config and the error classes must not import the host libraries either."""
    result = _run(
        "import json, sys\n"
        "import apt_plugins\n"
        "pm = apt_plugins.get_plugin_manager()\n"
        "names = pm.registry.names()\n"
        "apt_plugins.AptConfig(stage=2, vlm_mode='full').to_settings()\n"
        "apt_plugins.__version__\n"
        f"print(json.dumps({{'names': names, 'loaded': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n"
    )
    assert {"lerobot_pi0", "lerobot_pi05"} <= set(result["names"])
    assert result["loaded"] == []


def test_lazy_torch_attributes():
    result = _run(
        "import json, sys\n"
        "import apt_plugins\n"
        "before = 'torch' in sys.modules\n"
        "cls = apt_plugins.GatedCrossAttention\n"
        "print(json.dumps({'before': before, 'after': 'torch' in sys.modules, 'mod': cls.__module__}))\n"
    )
    assert result == {"before": False, "after": True, "mod": "apt_plugins.gating"}


def test_unknown_attribute_raises_attribute_error():
    import pytest

    import apt_plugins

    with pytest.raises(AttributeError, match="module 'apt_plugins' has no attribute 'nonexistent'"):
        apt_plugins.nonexistent  # noqa: B018
    assert isinstance(apt_plugins.__version__, str)
    assert set(apt_plugins.__all__) <= set(dir(apt_plugins)) | set(apt_plugins._LAZY) | {"__version__"}
