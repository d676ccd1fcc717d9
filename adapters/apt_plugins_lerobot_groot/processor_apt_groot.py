"""Processors of the ``apt_groot`` type: LeRobot's GR00T N1.7 pipelines, unchanged.

The groot processor already emits everything APT needs: the Qwen3-VL prompt puts every image first
and the text last, so the model finds the instruction span from ``input_ids`` itself.
"""

from lerobot.policies.groot.processor_groot import make_groot_pre_post_processors


def make_apt_groot_pre_post_processors(config, dataset_stats=None, dataset_meta=None):
    """Same pipelines as ``make_groot_pre_post_processors``."""
    return make_groot_pre_post_processors(config, dataset_stats=dataset_stats, dataset_meta=dataset_meta)
