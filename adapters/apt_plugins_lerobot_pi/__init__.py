"""APT adapter for LeRobot's pi0 and pi0.5 policies (``PI0Policy``, ``PI05Policy``, lerobot 0.6.1).

A plugin like any third-party one: found through the ``apt_plugins.adapters`` entry point, using
only the public API of :mod:`apt_plugins`. Importing this package is cheap; LeRobot is imported
when an adapter is first used.

LeRobot policy types (LeRobot's ``configuration_*/modeling_*/processor_*`` naming):
``apt_pi0`` and ``apt_pi05``.
"""

from apt_plugins import hookimpl


@hookimpl
def apt_register_adapters(register):
    """Register the pi0 and pi0.5 adapters."""
    from .adapter import PI0Adapter, PI05Adapter

    register(PI0Adapter)
    register(PI05Adapter)
