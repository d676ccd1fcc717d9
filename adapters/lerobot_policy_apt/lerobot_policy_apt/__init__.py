"""Imported by LeRobot at CLI start (distribution name prefix ``lerobot_policy_``).

Registers every APT policy type of every installed LeRobot adapter with LeRobot's config registry,
so ``--policy.type=apt_pi0`` and ``--policy.path=<APT checkpoint>`` work without flags.
"""

from apt_plugins.lerobot import register_lerobot_types

APT_POLICY_TYPES = register_lerobot_types()
