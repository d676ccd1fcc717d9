"""The language evaluator: how much does a LeRobot policy follow its instruction?

Works for any language-conditioned LeRobot policy, stock (pi0, pi05, smolvla, groot) or APT
(``apt_*``), with the checkpoint's own processors. Open loop (:func:`evaluate_language`): dataset
frames under counterfactual instructions (:data:`VARIANTS`), action divergence from the original,
distance to the ground truth of the original and of the swapped task, and the
instruction-following index. Closed loop (:mod:`.closed_loop`): ``lerobot-eval`` episodes with an
overridden instruction, with a check that the new tokens reached the policy. Definitions and the
JSON schema: ``docs/language_eval.md``.

Example::

    from apt_plugins.lerobot.language_eval import evaluate_language

    report = evaluate_language("outputs/s2/checkpoints/last/pretrained_model", "local/apt_demo",
                               dataset_root="data/apt_demo", frames=32, seed=0, device="cuda")
    print(report.format_table())
    report.write_json("language.json")
    report.save_plots("plots/")

Importing this package does not import torch or LeRobot; they load on first use.
"""

from __future__ import annotations

from typing import Any

from .variants import (
    DEFAULT_PARAPHRASE_RULES,
    MEANING_CHANGING,
    MEANING_PRESERVING,
    VARIANTS,
    ParaphraseRules,
    corrupt,
    load_paraphrase_rules,
    make_variant,
    paraphrase,
    shuffle_words,
    swap_task,
)

__all__ = [
    "evaluate_language",
    "compare_policies",
    "LanguageReport",
    "LoadedPolicy",
    "load_policy",
    "format_comparison",
    "plot_divergence_bars",
    "plot_task_heatmap",
    "SCHEMA_VERSION",
    "VARIANTS",
    "MEANING_CHANGING",
    "MEANING_PRESERVING",
    "ParaphraseRules",
    "DEFAULT_PARAPHRASE_RULES",
    "load_paraphrase_rules",
    "make_variant",
    "paraphrase",
    "shuffle_words",
    "swap_task",
    "corrupt",
]

_LAZY = {
    "evaluate_language": "runner",
    "LoadedPolicy": "runner",
    "load_policy": "runner",
    "LanguageReport": "report",
    "SCHEMA_VERSION": "report",
    "format_comparison": "report",
    "plot_divergence_bars": "plots",
    "plot_task_heatmap": "plots",
}


def compare_policies(policies: list[Any], dataset: Any, **kwargs: Any) -> list[Any]:
    """Run :func:`evaluate_language` on each policy (paths or objects) with the same settings.

    Returns the reports in order; put them in one table with :func:`format_comparison` and one plot
    with :func:`plot_divergence_bars`. Every report uses the same frames, variants and noise.
    """
    from .runner import evaluate_language

    return [evaluate_language(p, dataset, **kwargs) for p in policies]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)
