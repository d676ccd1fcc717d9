"""LeRobot policy class of the ``apt_pi0`` type (found by LeRobot's naming convention)."""

from lerobot.policies.pi0.modeling_pi0 import PI0Policy

from apt_plugins.lerobot.policy import AptPolicyMixin

from .configuration_apt_pi0 import APTPI0Config


class APTPI0Policy(AptPolicyMixin, PI0Policy):
    """``PI0Policy`` with the APT stage given by ``config.apt`` prepared at construction."""

    config_class = APTPI0Config
    name = "apt_pi0"
    adapter_name = "lerobot_pi0"
