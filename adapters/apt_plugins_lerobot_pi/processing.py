"""Processor steps that tell the model where the task text is inside the pi0.5 prompt.

pi0.5 builds ``"Task: <task>, State: <bins>;\\nAction: "`` before tokenising. APT must hide the
task text but keep the state visible, so the span is taken from the processor, which knows it,
instead of being guessed from token ids: :class:`RecordTaskTextStep` keeps the cleaned task
before the prompt is built, and :class:`TaskSpanTokenizerStep` (a ``TokenizerProcessorStep``)
tokenises with character offsets and emits ``observation.language.task_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lerobot.lerobot_types import EnvTransition, TransitionKey
from lerobot.processor import ProcessorStep, ProcessorStepRegistry, TokenizerProcessorStep

from apt_plugins import LanguageMaskError

TASK_TEXT_KEY = "apt_task_text"
TASK_MASK_KEY = "observation.language.task_mask"


def clean_task(task: str) -> str:
    """The cleaning pi0.5 applies to a task before building its prompt."""
    return task.strip().replace("_", " ").replace("\n", " ")


def task_clause(prompt: str, task: str) -> tuple[int, int]:
    """Character span to hide for ``task`` inside ``prompt``.

    For pi0.5's ``"Task: <task>, State: ..."`` this is the whole ``"Task: <task>,"`` clause: subword
    tokenizers merge the separators with their neighbours (``"cube,"`` vs an empty task's ``" ,"``),
    so hiding only the task words would let the scaffolding tokens reveal the task's presence or
    shape. The scaffolding carries nothing else. For other prompts: the task text itself.
    """
    if prompt.startswith("Task: "):
        start = prompt.find(task, len("Task: "))
        if start >= 0:
            end = start + len(task)
            return 0, end + 1 if prompt[end : end + 1] == "," else end
    start = prompt.find(task)
    if start < 0:
        raise LanguageMaskError(
            f"task text {task!r} not found in the prompt {prompt!r}: a processor step between "
            "RecordTaskTextStep and the tokenizer rewrote the task. Keep the apt_pi05 pipeline order "
            "(make_apt_pi05_pre_post_processors) or set apt.language_mask_scope='prompt'."
        )
    return start, start + len(task)


@ProcessorStepRegistry.register(name="apt_record_task_text")
@dataclass
class RecordTaskTextStep(ProcessorStep):
    """Copy the (cleaned) task strings aside before the prompt is assembled around them."""

    task_key: str = "task"

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        transition = transition.copy()
        data = dict(transition.get(TransitionKey.COMPLEMENTARY_DATA) or {})
        tasks = data.get(self.task_key)
        if tasks is not None:
            tasks = [tasks] if isinstance(tasks, str) else list(tasks)
            data[TASK_TEXT_KEY] = [clean_task(t) for t in tasks]
        transition[TransitionKey.COMPLEMENTARY_DATA] = data
        return transition

    def get_config(self) -> dict[str, Any]:
        return {"task_key": self.task_key}

    def transform_features(self, features):
        return features


@ProcessorStepRegistry.register(name="apt_task_span_tokenizer")
@dataclass
class TaskSpanTokenizerStep(TokenizerProcessorStep):
    """``TokenizerProcessorStep`` that also marks which prompt tokens belong to the task text."""

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        out = super().observation(observation)
        prompts = self.get_task(self.transition)
        data = self.transition.get(TransitionKey.COMPLEMENTARY_DATA) or {}
        tasks = data.get(TASK_TEXT_KEY)
        if tasks is None or len(tasks) != len(prompts):
            raise LanguageMaskError(
                "TaskSpanTokenizerStep needs the task text recorded by RecordTaskTextStep earlier in the "
                "same pipeline (use make_apt_pi05_pre_post_processors)."
            )
        enc = self.input_tokenizer(
            prompts,
            max_length=self.max_length,
            truncation=self.truncation,
            padding=self.padding,
            padding_side=self.padding_side,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        offsets = enc["offset_mapping"]  # (B, L, 2) character spans
        starts, ends = [], []
        for prompt, task in zip(prompts, tasks, strict=True):
            start, end = task_clause(prompt, task)
            starts.append(start)
            ends.append(end)
        starts_t = torch.tensor(starts)[:, None]
        ends_t = torch.tensor(ends)[:, None]
        inside = (offsets[..., 0] < ends_t) & (offsets[..., 1] > starts_t) & (offsets[..., 1] > offsets[..., 0])
        mask = inside & enc["attention_mask"].bool()
        out[TASK_MASK_KEY] = mask.to(out["observation.language.tokens"].device)
        return out


PREPROCESSOR_FILE = "policy_preprocessor.json"


def apt_pi05_preprocessor_config(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A stock pi0.5 pre-processor config (parsed ``policy_preprocessor.json``) with the task-span steps.

    Inserts ``apt_record_task_text`` before the prompt builder and swaps the tokenizer step for
    ``apt_task_span_tokenizer`` (same settings). Step state files are referenced by name, so
    inserting a step leaves them valid. Returns the new config and one line per change; ``[]``
    (and ``data`` itself) when it already has the steps.
    """
    names = [s.get("registry_name") for s in data.get("steps", [])]
    if "apt_task_span_tokenizer" in names:
        return data, []
    steps, changes = [], []
    for step in data.get("steps", []):
        if step.get("registry_name") == "pi05_prepare_state_tokenizer_processor_step":
            steps.append({"registry_name": "apt_record_task_text",
                          "config": {"task_key": step.get("config", {}).get("task_key", "task")}})
            changes.append("added apt_record_task_text before pi05_prepare_state_tokenizer_processor_step "
                           "(keeps the task text aside before the prompt is built)")
        if step.get("registry_name") == "tokenizer_processor":
            step = {**step, "registry_name": "apt_task_span_tokenizer"}
            changes.append("tokenizer_processor -> apt_task_span_tokenizer, same settings "
                           "(also emits observation.language.task_mask)")
        steps.append(step)
    if not changes:
        return data, []
    return {**data, "steps": steps}, changes


def rewrite_pi05_preprocessor(directory: Any) -> bool:
    """Give a copied stock pi0.5 preprocessor the task-span steps, in place. Returns True if changed.

    See :func:`apt_pi05_preprocessor_config` for what changes.
    """
    import json
    from pathlib import Path

    path = Path(directory) / PREPROCESSOR_FILE
    if not path.is_file():
        return False
    data, changes = apt_pi05_preprocessor_config(json.loads(path.read_text()))
    if changes:
        path.write_text(json.dumps(data, indent=2))
    return bool(changes)
