"""Processors of the ``apt_pi05`` type: LeRobot's pi0.5 pipelines plus the task-span mask."""

from dataclasses import fields

from lerobot.policies.pi05.processor_pi05 import (
    Pi05PrepareStateTokenizerProcessorStep,
    make_pi05_pre_post_processors,
)
from lerobot.processor import TokenizerProcessorStep

from .processing import RecordTaskTextStep, TaskSpanTokenizerStep


def make_apt_pi05_pre_post_processors(config, dataset_stats=None):
    """``make_pi05_pre_post_processors`` with the task text recorded and its token span emitted.

    The pre-processor additionally yields ``observation.language.task_mask`` (bool, B x L), which
    the APT model uses to hide the task while the state tokens of the prompt stay visible.
    """
    pre, post = make_pi05_pre_post_processors(config, dataset_stats=dataset_stats)
    steps = []
    for step in pre.steps:
        if isinstance(step, Pi05PrepareStateTokenizerProcessorStep):
            steps.append(RecordTaskTextStep(task_key=step.task_key))
        if type(step) is TokenizerProcessorStep:
            init = {f.name: getattr(step, f.name) for f in fields(step) if f.init and f.name != "tokenizer"}
            init["tokenizer"] = step.input_tokenizer  # reuse the loaded tokenizer; no second lookup
            span = TaskSpanTokenizerStep(**init)
            span.tokenizer = None  # keep tokenizer_name in the saved config, as the stock step does
            step = span
        steps.append(step)
    pre.steps = steps
    return pre, post
