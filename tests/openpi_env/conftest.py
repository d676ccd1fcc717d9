"""The openpi tests run in the openpi environment (``.venv-openpi``, built by ``make test``).

Elsewhere (the LeRobot environment, a clone without the openpi snapshot) every test here is
skipped with a message saying how to provide openpi; nothing here imports openpi at collection.
"""

import importlib.util

import pytest

SKIP_REASON = (
    "openpi is not installed in this environment. These tests run in .venv-openpi: `make test` builds it "
    "from ../shared/upstreams/openpi-15a9616.tar.gz, or from your checkout with APT_OPENPI_SRC=/path/to/openpi "
    "make test (or APT_OPENPI_SNAPSHOT=/path/to/openpi.tar.gz); then .venv-openpi/bin/python -m pytest tests/openpi_env"
)

HAVE_OPENPI = importlib.util.find_spec("openpi") is not None
# Without openpi the suite module would only parametrise (and skip) every other adapter's cases again.
collect_ignore = [] if HAVE_OPENPI else ["test_openpi_conformance.py"]


def pytest_collection_modifyitems(config, items):
    if HAVE_OPENPI:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "tests/openpi_env/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
