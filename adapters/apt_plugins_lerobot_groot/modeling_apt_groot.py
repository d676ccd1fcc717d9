"""LeRobot policy class of the ``apt_groot`` type (found by LeRobot's naming convention)."""

from lerobot.policies.groot.modeling_groot import GrootPolicy

from apt_plugins.lerobot.policy import AptPolicyMixin

from .configuration_apt_groot import APTGrootConfig


class APTGrootPolicy(AptPolicyMixin, GrootPolicy):
    """``GrootPolicy`` with the APT stage given by ``config.apt`` prepared at construction.

    The stage is prepared after ``GrootPolicy.__init__`` has loaded ``GR00TN17`` from
    ``base_model_path``, so the fusion layers are created (zero output) after the transformers
    loader ran, never re-initialised by it. Loading is the mixin's strict loader (with Stage 1 ->
    Stage 2 promotion), not GrootPolicy's.
    """

    config_class = APTGrootConfig
    name = "apt_groot"
    adapter_name = "lerobot_groot"
