"""Processors of the ``apt_smolvla`` type: LeRobot's SmolVLA processors (the prompt is the task itself)."""

from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors


def make_apt_smolvla_pre_post_processors(config, dataset_stats=None):
    """Same pipelines as ``make_smolvla_pre_post_processors``: SmolVLA's whole prompt is the task text,
    and its state is a separate prefix token, so the APT model needs no extra input."""
    return make_smolvla_pre_post_processors(config, dataset_stats=dataset_stats)
