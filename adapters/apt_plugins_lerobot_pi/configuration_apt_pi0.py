"""LeRobot config of the ``apt_pi0`` policy type: ``PI0Config`` plus the ``apt`` settings."""

from dataclasses import dataclass, field

from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.pi0.configuration_pi0 import PI0Config

from apt_plugins import AptConfig, AptSettings


@PreTrainedConfig.register_subclass("apt_pi0")
@dataclass
class APTPI0Config(PI0Config):
    """``PI0Config`` with APT: set ``--policy.apt.stage=1|2`` and the other ``apt.*`` fields."""

    apt: AptSettings = field(default_factory=AptSettings)

    def __post_init__(self):
        super().__post_init__()
        # Validate once, at the boundary: a bad value fails here naming policy.apt.<field>.
        AptConfig.from_settings(self.apt, prefix="policy.apt")
