"""pytest plugin (entry point ``pytest11: apt_plugins``): parametrises the conformance suite.

Options:

- ``--apt-adapter NAME`` (repeatable): run the suite only for these adapters.
- ``--apt-check NAME`` (repeatable): run only these checks.

Heavy imports (torch, host libraries) happen inside the checks, so loading this plugin is cheap
for test suites that never use it.
"""

from __future__ import annotations

from typing import Any


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("apt_plugins", "apt-plugins conformance suite")
    group.addoption("--apt-adapter", action="append", default=[], help="only run the suite for this adapter")
    group.addoption("--apt-check", action="append", default=[], help="only run this conformance check")


def _cases(config: Any) -> list[Any]:
    import pytest

    from .. import get_plugin_manager
    from .conformance import CHECKS

    wanted = set(config.getoption("--apt-adapter") or [])
    checks = set(config.getoption("--apt-check") or []) or set(CHECKS)
    registry = get_plugin_manager().registry
    unknown = wanted - set(registry.names())
    if unknown:
        raise pytest.UsageError(f"--apt-adapter: unknown adapter(s) {sorted(unknown)}; known: {registry.names()}")
    unknown_checks = checks - set(CHECKS)
    if unknown_checks:
        raise pytest.UsageError(f"--apt-check: unknown check(s) {sorted(unknown_checks)}; known: {sorted(CHECKS)}")
    params = []
    for adapter in registry:
        if wanted and adapter.name not in wanted:
            continue
        if adapter.host_version() is None:
            # A kit builds real host instances, so it cannot run where the host is absent (the openpi
            # adapters in the LeRobot environment): a visible skip, not a failure.
            params.append(pytest.param((None, adapter.name, None, "host"), id=f"{adapter.name}-host-not-installed",
                                       marks=pytest.mark.skip(reason=f"{adapter.host} is not installed in this "
                                                              f"environment; the {adapter.name} cases run where it is")))
            continue
        kit = adapter.conformance_kit()
        if kit is None:
            # An adapter without a kit is untested, which is a failure, not a skip.
            params.append(pytest.param((None, adapter.name, None, "kit"), id=f"{adapter.name}-missing-kit"))
            continue
        for config_name, cfg in kit.stage_configs().items():
            for check, (_, stages) in CHECKS.items():
                if check not in checks or (stages != "all" and str(cfg.stage) != stages):
                    continue
                marks = [pytest.mark.apt_adapter(adapter.name)]
                params.append(pytest.param((kit, config_name, cfg, check), id=f"{adapter.name}-{config_name}-{check}",
                                           marks=marks))
    return params


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "apt_adapter(name): conformance case of one adapter")


def pytest_generate_tests(metafunc: Any) -> None:
    if "apt_case" in metafunc.fixturenames:
        metafunc.parametrize("apt_case", _cases(metafunc.config))


def pytest_runtest_setup(item: Any) -> None:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("apt_case") if callspec else None
    if case is not None and case[0] is None and case[3] == "kit":
        import pytest

        pytest.fail(f"adapter {case[1]!r} has no conformance kit (Adapter.conformance_kit() returned None)")
