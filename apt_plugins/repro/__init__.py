"""The CPU-scale reproduction of APT's effect (``apt-plugins repro``; see ``docs/repro.md``).

A language-conditioned reaching task with a built-in visual shortcut, rendered and scored by a
scripted expert; a tiny PaliGemma pretrained on grounding so it has language ability to keep or
lose; stock LeRobot ``PI0Policy`` arms against APT ``apt_pi0`` arms, several seeds, a table and
plots.

Modules: :mod:`.world` (scenes, instructions, expert), :mod:`.data` (LeRobotDatasets),
:mod:`.models` (the real policy classes at CPU size), :mod:`.grounding` (VLM pretraining and the
drift probe), :mod:`.arms` (training and scoring), :mod:`.report`, :mod:`.run` (the command).
Importing this package imports neither torch nor LeRobot.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_repro", "ReproConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
