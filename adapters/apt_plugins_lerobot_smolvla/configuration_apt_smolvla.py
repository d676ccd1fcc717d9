"""LeRobot config of the ``apt_smolvla`` policy type: ``SmolVLAConfig`` plus the ``apt`` settings."""

from dataclasses import dataclass, field

from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from apt_plugins import AptConfig, AptSettings


@PreTrainedConfig.register_subclass("apt_smolvla")
@dataclass
class APTSmolVLAConfig(SmolVLAConfig):
    """``SmolVLAConfig`` with APT: set ``--policy.apt.stage=1|2`` and the other ``apt.*`` fields.

    SmolVLA's own freezing flags (``train_expert_only``, ``freeze_vision_encoder``) are superseded by
    ``apt.vlm_mode``: APT freezes and trains by parameter group.
    """

    apt: AptSettings = field(default_factory=AptSettings)

    def __post_init__(self):
        super().__post_init__()
        # Validate once, at the boundary: a bad value fails here naming policy.apt.<field>.
        AptConfig.from_settings(self.apt, prefix="policy.apt")
