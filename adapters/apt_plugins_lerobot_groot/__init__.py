"""APT adapter for LeRobot's GR00T N1.7 policy (``GrootPolicy``, lerobot 0.6.1).

A plugin like any third-party one: found through the ``apt_plugins.adapters`` entry point, using
only the public API of :mod:`apt_plugins`. Importing this package is cheap; LeRobot (and the
``groot`` extra: diffusers, dm-tree) is imported when the adapter is first used.

LeRobot policy type (LeRobot's ``configuration_*/modeling_*/processor_*`` naming): ``apt_groot``.
"""

from apt_plugins import hookimpl


@hookimpl
def apt_register_adapters(register):
    """Register the GR00T N1.7 adapter."""
    from .adapter import GrootAdapter

    register(GrootAdapter)
