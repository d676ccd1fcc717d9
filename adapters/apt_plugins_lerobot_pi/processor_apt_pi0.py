"""Processors of the ``apt_pi0`` type: LeRobot's pi0 processors (pi0's prompt is the task itself)."""

from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors


def make_apt_pi0_pre_post_processors(config, dataset_stats=None):
    """Same pipelines as ``make_pi0_pre_post_processors``; the whole pi0 prompt is the task text."""
    return make_pi0_pre_post_processors(config, dataset_stats=dataset_stats)
