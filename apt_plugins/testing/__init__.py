"""The conformance suite: the definition of "an adapter works".

Every registered adapter that ships a :class:`~apt_plugins.testing.kit.ConformanceKit` is run
through every check, for every stage configuration the kit declares. A new adapter joins by
registering; there is no list to edit. Third-party adapters get the same suite through the pytest
plugin: ``pytest --apt-adapter=<name>`` over a module containing::

    from apt_plugins.testing import AdapterConformance

    class TestMyAdapter(AdapterConformance):
        pass

A kit usually subclasses :class:`ConformanceKitBase` (any host) or :class:`LeRobotConformanceKit`
(LeRobot hosts), which supply the seeded ``loss``/``actions``, ``perturb_fusion``, ``save`` and the
standard stage configurations (:func:`standard_stage_configs`).
"""

from .base import ConformanceKitBase, LeRobotConformanceKit, standard_stage_configs
from .conformance import CHECKS, AdapterConformance
from .kit import ConformanceKit

__all__ = ["AdapterConformance", "CHECKS", "ConformanceKit", "ConformanceKitBase", "LeRobotConformanceKit",
           "standard_stage_configs"]
