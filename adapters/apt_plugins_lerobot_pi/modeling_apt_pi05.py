"""LeRobot policy class of the ``apt_pi05`` type (found by LeRobot's naming convention)."""

from lerobot.policies.pi05.modeling_pi05 import PI05Policy

from apt_plugins.lerobot.policy import AptPolicyMixin

from .configuration_apt_pi05 import APTPI05Config


class APTPI05Policy(AptPolicyMixin, PI05Policy):
    """``PI05Policy`` with the APT stage given by ``config.apt`` prepared at construction."""

    config_class = APTPI05Config
    name = "apt_pi05"
    adapter_name = "lerobot_pi05"
