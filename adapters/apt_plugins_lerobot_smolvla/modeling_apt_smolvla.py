"""LeRobot policy class of the ``apt_smolvla`` type (found by LeRobot's naming convention)."""

from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from apt_plugins.lerobot import AptPolicyMixin

from .configuration_apt_smolvla import APTSmolVLAConfig


class APTSmolVLAPolicy(AptPolicyMixin, SmolVLAPolicy):
    """``SmolVLAPolicy`` with the APT stage given by ``config.apt`` prepared at construction."""

    config_class = APTSmolVLAConfig
    name = "apt_smolvla"
    adapter_name = "lerobot_smolvla"
