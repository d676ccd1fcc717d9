"""The conformance suite on openpi's own PI0Pytorch (pi0 and pi0.5), tiny random weights, every stage config."""

from apt_plugins.testing import AdapterConformance


class TestOpenpiConformance(AdapterConformance):
    pass
