"""LeRobot config of the ``apt_groot`` policy type: ``GrootConfig`` plus the ``apt`` settings."""

from dataclasses import dataclass, field

from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.groot.configuration_groot import GrootConfig

from apt_plugins import AptConfig, AptSettings


@PreTrainedConfig.register_subclass("apt_groot")
@dataclass
class APTGrootConfig(GrootConfig):
    """``GrootConfig`` with APT: set ``--policy.apt.stage=1|2`` and the other ``apt.*`` fields."""

    apt: AptSettings = field(default_factory=AptSettings)

    def __post_init__(self):
        super().__post_init__()
        # Validate once, at the boundary: a bad value fails here naming policy.apt.<field>.
        AptConfig.from_settings(self.apt, prefix="policy.apt")
