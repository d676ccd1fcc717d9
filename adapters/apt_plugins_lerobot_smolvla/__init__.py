"""APT adapter for LeRobot's SmolVLA policy (``SmolVLAPolicy``, lerobot 0.6.1).

A plugin like any third-party one: found through the ``apt_plugins.adapters`` entry point, using
only the public API of :mod:`apt_plugins`. Importing this package is cheap; LeRobot is imported
when the adapter is first used.

LeRobot policy type (LeRobot's ``configuration_*/modeling_*/processor_*`` naming): ``apt_smolvla``.
"""

from apt_plugins import hookimpl


@hookimpl
def apt_register_adapters(register):
    """Register the SmolVLA adapter."""
    from .adapter import SmolVLAAdapter

    register(SmolVLAAdapter)
