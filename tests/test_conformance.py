"""The conformance suite over every registered adapter x stage configuration x check."""

from apt_plugins.testing import AdapterConformance


class TestConformance(AdapterConformance):
    pass
