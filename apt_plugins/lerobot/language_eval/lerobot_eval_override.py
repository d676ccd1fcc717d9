"""The instruction override inside the ``lerobot-eval`` binary itself.

Load it with LeRobot's plugin flag and choose the variant with an environment variable::

    APT_EVAL_INSTRUCTION=task_swap lerobot-eval --policy.path=<ckpt> --env.type=apt_blocks \\
        --env.discover_packages_path=apt_plugins.lerobot.language_eval.lerobot_eval_override ...

Every vector env ``lerobot-eval`` evaluates gets :class:`InstructionOverride` on each sub-env and
the delivery guard (the run fails with ``InstructionNotDeliveredError`` if the changed instruction
did not reach the policy's tokens). Settings, all environment variables:

- ``APT_EVAL_INSTRUCTION``: the variant (``task_swap``, ``empty``, ``shuffled``, ``paraphrase``,
  ``corrupted``, ``original``); required.
- ``APT_EVAL_INSTRUCTION_SEED``: fixes the changed instructions (default 0).
- ``APT_EVAL_INSTRUCTION_TASKS``: a JSON list of the tasks ``task_swap`` draws from (default: the
  ``apt_blocks`` tasks).
- ``APT_EVAL_INSTRUCTION_LOG``: a file that gets one JSON line per evaluated env: the variant, the
  instruction shown and the task scored per episode, success, and the number of steps whose tokens
  were checked.

Importing this module patches ``lerobot.scripts.lerobot_eval.eval_policy`` for the process; it is
meant only for a ``lerobot-eval`` process.
"""

import apt_plugins.lerobot.env  # noqa: F401  (--env.type=apt_blocks needs no second plugin flag)

from .closed_loop import install_lerobot_eval_override

install_lerobot_eval_override()
