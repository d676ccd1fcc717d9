"""Closed loop: ``lerobot-eval`` episodes with an overridden instruction, and proof that it reached the policy.

:class:`InstructionOverride` wraps any gym env LeRobot makes: the policy is shown a changed
instruction (``task_description``/``task``, the attributes ``lerobot-eval`` reads), while the
episode is scored by the env. For ``task_swap`` in an env that can be re-targeted (the built-in
``apt_blocks``; add others to :data:`RETARGET`), the env is switched to the new task after reset,
in the same scene, so success means "did what the *new* instruction said".

:class:`DeliveryGuard` guards against the known harness bug where an overridden prompt never
reaches the policy (LIBERO-PRO runners read the task from file names): it records the instruction
in every observation handed to the pre-processor and the language tokens of every batch
``select_action`` is called with, and checks, step by step, that the observation carried the
override and that the tokens differ from those the original instruction gives.

:func:`evaluate_closed_loop` runs LeRobot's own ``eval_policy`` (the ``lerobot-eval`` rollout
loop) once per variant with both in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym

from ...errors import AptConfigError, InstructionNotDeliveredError
from .variants import DEFAULT_PARAPHRASE_RULES, VARIANTS, ParaphraseRules, make_variant, validate_variants

__all__ = ["InstructionOverride", "DeliveryGuard", "ClosedLoopReport", "evaluate_closed_loop", "rollout_with_override",
           "RETARGET", "retarget_blocks", "settings_from_environment", "install_lerobot_eval_override"]


def retarget_blocks(env: Any, instruction: str) -> bool:
    """Score an ``apt_blocks`` episode for ``instruction``'s block, in the same scene and start pose."""
    from ..env import instruction_for

    try:
        env.task = instruction_for(instruction)
    except ValueError:
        return False
    env.target = __import__("numpy").array(env.layout[env.task.split()[2]])
    return True


#: env class name -> function that re-targets an env instance to a new instruction (True when it did).
RETARGET: dict[str, Callable[[Any, str], bool]] = {"BlocksReachEnv": retarget_blocks}


class InstructionOverride(gym.Wrapper):
    """Show the policy a changed instruction; score the new task where the env can be re-targeted.

    :param env: any gym env with a ``task_description`` or ``task`` attribute.
    :param variant: an instruction variant (:data:`VARIANTS`).
    :param tasks: the tasks ``task_swap`` draws from (the env's tasks or the training dataset's).
    :param seed: fixes the changed instruction of each episode.
    """

    def __init__(self, env: gym.Env, variant: str, tasks: Sequence[str] = (), seed: int = 0,
                 rules: ParaphraseRules = DEFAULT_PARAPHRASE_RULES, vocabulary: Sequence[str] | None = None):
        super().__init__(env)
        validate_variants([variant])
        self.variant = variant
        self.tasks = list(tasks)
        self.seed = seed
        self.rules = rules
        self.vocabulary = vocabulary
        self.episodes = 0
        self.original_instruction = ""
        self.instruction = ""
        self.scored_task = ""
        self.history: list[dict[str, Any]] = []

    def _env_instruction(self) -> str:
        for name in ("task_description", "task"):
            try:
                value = self.env.get_wrapper_attr(name)
            except AttributeError:
                continue
            if isinstance(value, str):
                return value
        return ""

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        self.original_instruction = self._env_instruction()
        rng = random.Random(f"{self.seed}:{kwargs.get('seed')}:{self.episodes}:{self.variant}")
        changed = make_variant(self.variant, self.original_instruction, rng, self.tasks, self.rules, self.vocabulary)
        self.instruction = self.original_instruction if changed is None else changed
        self.scored_task = self.original_instruction
        if self.variant == "task_swap" and changed is not None:
            retarget = RETARGET.get(type(self.env.unwrapped).__name__)
            if retarget is not None and retarget(self.env.unwrapped, changed):
                self.scored_task = changed
        self.episodes += 1
        if kwargs.get("seed") is None:  # a vector env's auto-reset after the episode ended: not scored
            return obs, {**info, "instruction": self.instruction, "scored_task": self.scored_task}
        self.history.append({"original": self.original_instruction, "shown": self.instruction,
                             "scored_task": self.scored_task})
        return obs, {**info, "instruction": self.instruction, "scored_task": self.scored_task}

    @property
    def task_description(self) -> str:
        """The instruction the policy is shown (what ``lerobot-eval`` reads)."""
        return self.instruction

    @property
    def task(self) -> str:
        """Same as :attr:`task_description`, for harnesses that read ``task``."""
        return self.instruction


class DeliveryGuard:
    """Record what reached the pre-processor and the policy, then check the override arrived.

    Hand the rollout :meth:`preprocessor` instead of the pre-processor, record the policy's inputs
    with :func:`~apt_plugins.lerobot.language_eval.runner.record_policy_inputs`, then call
    :meth:`check`: it raises :class:`InstructionNotDeliveredError` on the first step where the
    observation did not carry the changed instruction, or where the tokens the policy saw equal the
    ones the original instruction gives.

    :param preprocessor: the policy's pre-processor.
    :param language_keys: the batch keys that carry the instruction.
    :param vec_env: the ``SyncVectorEnv`` whose sub-envs are :class:`InstructionOverride`.
    """

    def __init__(self, preprocessor: Any, language_keys: list[str], vec_env: Any):
        self._pre = preprocessor
        self.keys = language_keys
        self.vec_env = vec_env
        self.steps: list[dict[str, Any]] = []

    def preprocessor(self, observation: dict[str, Any]) -> dict[str, Any]:
        """The wrapped pre-processor: records the raw observation and the override of each sub-env."""
        overrides = [env for env in self.vec_env.envs]
        self.steps.append({
            "observation": {k: v for k, v in observation.items() if k != "task"},
            "task": list(observation.get("task", [])),
            "shown": [e.get_wrapper_attr("instruction") for e in overrides],
            "original": [e.get_wrapper_attr("original_instruction") for e in overrides],
        })
        return self._pre(observation)

    def check(self, seen: list[dict[str, Any]], variant: str) -> int:
        """Check every recorded step; return how many (step, sub-env) pairs had their tokens checked."""
        from .runner import token_signature

        if len(seen) != len(self.steps):
            raise InstructionNotDeliveredError(
                variant, "?", "?", f"{len(self.steps)} pre-processor calls but {len(seen)} policy calls",
                "Something between the pre-processor and select_action dropped or added batches.")
        checked = 0
        for step, (record, tokens) in enumerate(zip(self.steps, seen, strict=True)):
            for row, (shown, original, task) in enumerate(zip(record["shown"], record["original"], record["task"],
                                                              strict=True)):
                where = f"episode step {step}, env {row}"
                if task.strip() != shown.strip():
                    raise InstructionNotDeliveredError(
                        variant, original, shown, where,
                        f"The observation handed to the pre-processor carried {task!r} instead: the harness reads "
                        "the instruction from somewhere other than the env's task_description/task.")
                if shown.strip() == original.strip():
                    continue
                expected = self._pre({**record["observation"], "task": list(record["original"])})
                if token_signature(tokens, self.keys, row) == token_signature(expected, self.keys, row):
                    raise InstructionNotDeliveredError(
                        variant, original, shown, where,
                        "The pre-processor gives the policy the original's tokens for the changed instruction.")
                checked += 1
        return checked


@dataclass
class ClosedLoopReport:
    """Per-variant success of closed-loop episodes (fields: ``docs/language_eval.md``)."""

    policy: dict[str, Any]
    env: dict[str, Any]
    settings: dict[str, Any]
    per_variant: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report."""
        return asdict(self)

    def write_json(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        from .report import write_json_atomic

        return write_json_atomic(path, self.to_dict())

    def format_table(self) -> str:
        """One row per variant: episodes, success for the scored task, tokens checked."""
        head = f"{'variant':<12} {'episodes':>8} {'success':>8} {'re-targeted':>11} {'tokens checked':>14}"
        lines = [f"closed loop: policy {self.policy.get('name')} in {self.env.get('type')}", head, "-" * len(head)]
        for variant, row in self.per_variant.items():
            lines.append(f"{variant:<12} {row['episodes']:>8} {row['success_rate']:>8.2f} {row['retargeted']:>11} "
                         f"{row['tokens_checked']:>14}")
        return "\n".join(lines)


@contextlib.contextmanager
def _lerobot_progress(enabled: bool | None):
    """Silence lerobot-eval's per-step progress bars off a terminal (they would flood CI logs)."""
    import sys
    from unittest import mock

    from lerobot.scripts import lerobot_eval
    from tqdm import trange

    if (sys.stderr.isatty() if enabled is None else enabled):
        yield
        return
    with mock.patch.object(lerobot_eval, "trange", lambda *a, **kw: trange(*a, **{**kw, "disable": True})):
        yield


def evaluate_closed_loop(
    policy_or_path: Any,
    env: Any,
    *,
    variants: Sequence[str] | None = None,
    episodes: int = 4,
    seed: int = 0,
    device: str = "cpu",
    tasks: Sequence[str] | None = None,
    paraphrase_rules: ParaphraseRules | None = None,
    preprocessor: Any = None,
    postprocessor: Any = None,
    dataset_stats: Any = None,
    name: str | None = None,
    progress: bool | None = None,
) -> ClosedLoopReport:
    """Run ``lerobot-eval``'s rollout loop under each instruction variant and score each episode.

    :param policy_or_path: a checkpoint directory (its own processors), a policy object or a
        :class:`~apt_plugins.lerobot.language_eval.LoadedPolicy`.
    :param env: a LeRobot ``EnvConfig`` (``AptBlocksEnvConfig()``) or its type name (``"apt_blocks"``).
    :param variants: the instruction variants (default: all).
    :param episodes: episodes per variant (one env, LeRobot's seeds ``seed, seed+1, ...``).
    :param tasks: the tasks ``task_swap`` draws from (default: the env's ``TASKS`` for ``apt_blocks``).
    :param progress: LeRobot's rollout progress bars (default: only on a terminal).
    :raises InstructionNotDeliveredError: an overridden instruction did not reach the policy.
    :raises AptConfigError: an unknown env type or a bad argument.
    """
    import torch
    from lerobot.envs.configs import EnvConfig
    from lerobot.envs.factory import make_env, make_env_config, make_env_pre_post_processors
    from lerobot.scripts.lerobot_eval import eval_policy

    from .runner import _as_loaded, check_device, tokenizer_vocabulary

    if episodes < 1:
        raise AptConfigError("eval.n_episodes", episodes, "run at least one episode.")
    check_device(device)
    chosen = validate_variants(variants)
    rules = DEFAULT_PARAPHRASE_RULES if paraphrase_rules is None else DEFAULT_PARAPHRASE_RULES.merged(paraphrase_rules)
    if not isinstance(env, EnvConfig):
        import apt_plugins.lerobot.env  # noqa: F401  (registers apt_blocks)

        try:
            env = make_env_config(str(env))
        except (ValueError, KeyError) as exc:
            raise AptConfigError("env.type", env, f"not a LeRobot env type ({exc}).") from None
    if tasks is None:
        from ..data import TASKS

        tasks = TASKS if env.type == "apt_blocks" else []
    loaded = _as_loaded(policy_or_path, dataset_stats, device, preprocessor, postprocessor, name)
    policy = loaded.policy.to(device).eval()
    env_pre, env_post = make_env_pre_post_processors(env_cfg=env, policy_cfg=policy.config)
    vocabulary = tokenizer_vocabulary(loaded.preprocessor)

    report = ClosedLoopReport(
        policy={"name": loaded.name, "type": getattr(policy.config, "type", None), "source": loaded.source},
        env={"type": env.type, "tasks": list(tasks)},
        settings={"episodes": episodes, "seed": seed, "device": device, "variants": list(chosen)},
    )
    for variant in chosen:
        suites = make_env(env, n_envs=1, use_async_envs=False)
        vec = next(iter(next(iter(suites.values())).values()))
        try:
            torch.manual_seed(seed)  # the same sampling noise for every variant
            with _lerobot_progress(progress):
                report.per_variant[variant] = rollout_with_override(
                    eval_policy, vec, policy, env_pre, env_post, loaded.preprocessor, loaded.postprocessor,
                    variant=variant, tasks=tasks, seed=seed, rules=rules, vocabulary=vocabulary,
                    n_episodes=episodes, start_seed=seed)
        finally:
            vec.close()
    return report


def rollout_with_override(eval_policy: Callable[..., dict], vec: Any, policy: Any, env_pre: Any, env_post: Any,
                          preprocessor: Any, postprocessor: Any, *, variant: str, tasks: Sequence[str], seed: int,
                          rules: ParaphraseRules = DEFAULT_PARAPHRASE_RULES, vocabulary: Sequence[str] | None = None,
                          **eval_kwargs: Any) -> dict[str, Any]:
    """Run LeRobot's ``eval_policy`` on ``vec`` with every sub-env overridden and the delivery guard on.

    Returns the variant's closed-loop record (``episodes``, ``success_rate``, ``successes``,
    ``retargeted``, ``tokens_checked``, ``instructions``) with LeRobot's own result under
    ``"lerobot"`` removed (callers that need it get it from :data:`LAST_EVAL_INFO`).

    :raises AptConfigError: ``vec`` is not a ``SyncVectorEnv`` (the sub-envs must be reachable).
    :raises NoLanguageInputError: the policy takes no instruction.
    :raises InstructionNotDeliveredError: the override did not reach the policy.
    """
    import torch
    from lerobot.envs.utils import preprocess_observation

    from ...errors import NoLanguageInputError
    from .runner import _PROBE_INSTRUCTION, language_keys, record_policy_inputs

    if not isinstance(vec, gym.vector.SyncVectorEnv):
        raise AptConfigError("eval.use_async_envs", True, "the instruction override wraps each sub-env in this "
                             "process; run with --eval.use_async_envs=false.")
    for i, sub in enumerate(vec.envs):
        if not isinstance(sub, InstructionOverride):
            vec.envs[i] = InstructionOverride(sub, variant, tasks, seed, rules, vocabulary)
    # The language inputs, from one real observation of this env: the batch keys the instruction changes.
    obs, _ = vec.reset(seed=[seed + i for i in range(vec.num_envs)])
    raw = env_pre(preprocess_observation(obs))
    raw.pop("task", None)
    first = [e.original_instruction for e in vec.envs]
    keys = language_keys(preprocessor, raw, [first, [""] * len(first), [_PROBE_INSTRUCTION] * len(first)])
    if not keys:
        raise NoLanguageInputError(repr(getattr(policy.config, "type", type(policy).__name__)),
                                   f"its pre-processor produced the same model inputs for {first[0]!r}, '' and "
                                   f"{_PROBE_INSTRUCTION!r}.")
    for e in vec.envs:
        e.history.clear()
    guard = DeliveryGuard(preprocessor, keys, vec)
    with record_policy_inputs(policy, keys, methods=("select_action",)) as seen, torch.no_grad():
        info = eval_policy(vec, policy, env_pre, env_post, guard.preprocessor, postprocessor, **eval_kwargs)
    checked = guard.check(seen, variant)
    LAST_EVAL_INFO[:] = [info]
    history = [h for e in vec.envs for h in e.history]
    successes = [bool(e["success"]) for e in info["per_episode"]]
    return {
        "episodes": len(successes),
        "success_rate": sum(successes) / len(successes) if successes else 0.0,
        "successes": successes,
        "retargeted": sum(h["scored_task"] != h["original"] for h in history[: len(successes)]),
        "tokens_checked": checked,
        "instructions": history[: len(successes)],
    }


#: LeRobot's own ``eval_policy`` result of the latest :func:`rollout_with_override` call.
LAST_EVAL_INFO: list[dict[str, Any]] = []


# ------------------------------------------------------------------ inside the lerobot-eval binary
_INSTALLED: dict[str, Any] = {}


def settings_from_environment(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The override settings from ``APT_EVAL_INSTRUCTION*``.

    :raises AptConfigError: the variant is missing or unknown, the seed is not an integer, or the
        task list is not a JSON list of strings.
    """
    environ = os.environ if environ is None else environ
    variant = environ.get("APT_EVAL_INSTRUCTION")
    if not variant:
        raise AptConfigError("APT_EVAL_INSTRUCTION", variant, f"set it to one of {', '.join(VARIANTS)}.")
    validate_variants([variant])
    try:
        seed = int(environ.get("APT_EVAL_INSTRUCTION_SEED", "0"))
    except ValueError:
        raise AptConfigError("APT_EVAL_INSTRUCTION_SEED", environ["APT_EVAL_INSTRUCTION_SEED"],
                             "use an integer.") from None
    tasks_text = environ.get("APT_EVAL_INSTRUCTION_TASKS")
    if tasks_text:
        try:
            tasks = json.loads(tasks_text)
        except json.JSONDecodeError:
            tasks = None
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise AptConfigError("APT_EVAL_INSTRUCTION_TASKS", tasks_text,
                                 'use a JSON list of instructions, e.g. ["pick the red block", "pick the blue block"].')
    else:
        from ..data import TASKS

        tasks = list(TASKS)
    return {"variant": variant, "seed": seed, "tasks": tasks, "log": environ.get("APT_EVAL_INSTRUCTION_LOG")}


def install_lerobot_eval_override(settings: dict[str, Any] | None = None) -> None:
    """Patch ``lerobot_eval.eval_policy`` so every evaluated env runs with the override and the guard."""
    from lerobot.scripts import lerobot_eval

    from .runner import tokenizer_vocabulary

    if _INSTALLED:
        return
    settings = settings or settings_from_environment()
    original = lerobot_eval.eval_policy

    def eval_policy(env, policy, env_preprocessor, env_postprocessor, preprocessor, postprocessor, n_episodes,
                    **kwargs):
        record = rollout_with_override(
            original, env, policy, env_preprocessor, env_postprocessor, preprocessor, postprocessor,
            variant=settings["variant"], tasks=settings["tasks"], seed=settings["seed"],
            vocabulary=tokenizer_vocabulary(preprocessor), n_episodes=n_episodes, **kwargs)
        if settings["log"]:
            with open(settings["log"], "a") as f:
                f.write(json.dumps({"variant": settings["variant"], **record}) + "\n")
        return LAST_EVAL_INFO[0]

    lerobot_eval.eval_policy = eval_policy
    _INSTALLED["eval_policy"] = original
