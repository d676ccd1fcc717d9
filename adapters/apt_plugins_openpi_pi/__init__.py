"""APT adapter for openpi's own PyTorch model (``openpi.models_pytorch.pi0_pytorch.PI0Pytorch``).

A plugin like any third-party one: found through the ``apt_plugins.adapters`` entry point, using
only the public API of :mod:`apt_plugins`. Importing this package never imports openpi, so
``apt-plugins list`` stays cheap in environments without it (the LeRobot one); openpi is imported
when an adapter is first used. Adapters: ``openpi_pi0`` and ``openpi_pi05``.
"""

from apt_plugins import hookimpl


@hookimpl
def apt_register_adapters(register):
    """Register the openpi pi0 and pi0.5 adapters."""
    from .adapter import OpenpiPI0Adapter, OpenpiPI05Adapter

    register(OpenpiPI0Adapter)
    register(OpenpiPI05Adapter)
