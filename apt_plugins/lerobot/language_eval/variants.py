"""Counterfactual instructions: the variants the language evaluator shows a policy.

Every generator is a pure function of the original instruction, the dataset's task list, a seeded
``random.Random`` and (for ``corrupted``) a vocabulary, so a report is reproducible from its seed.
No torch here: this module is cheap to import and to test.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...errors import AptConfigError

__all__ = [
    "VARIANTS",
    "MEANING_CHANGING",
    "MEANING_PRESERVING",
    "ParaphraseRules",
    "DEFAULT_PARAPHRASE_RULES",
    "load_paraphrase_rules",
    "paraphrase",
    "shuffle_words",
    "swap_task",
    "corrupt",
    "make_variant",
    "validate_variants",
]

#: Every variant, in report order. ``original`` re-runs the original instruction: its divergence
#: must be exactly zero, which proves the sampling noise is fixed.
VARIANTS = ("original", "task_swap", "empty", "shuffled", "paraphrase", "corrupted")
#: Variants that remove or change what the instruction asks for.
MEANING_CHANGING = ("task_swap", "empty", "shuffled", "corrupted")
#: Variants that ask for the same thing in other words.
MEANING_PRESERVING = ("paraphrase",)


class ParaphraseRules(BaseModel):
    """Rules for the ``paraphrase`` variant: word synonyms and sentence templates.

    A paraphrase replaces every word that has synonyms (whole words, case-insensitive) with one of
    them, chosen by the seeded RNG; if no word has a synonym, it wraps the instruction in a template
    instead. Templates contain ``{instruction}`` exactly once.

    :param synonyms: word -> alternatives (each may be several words).
    :param templates: sentence templates, e.g. ``"please {instruction}"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    synonyms: dict[str, list[str]] = Field(default_factory=dict, description="word -> alternatives")
    templates: list[str] = Field(default_factory=list, description="templates with one {instruction}")

    @field_validator("synonyms")
    @classmethod
    def _lowercase_nonempty(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for word, alternatives in value.items():
            if not word.strip() or " " in word.strip():
                raise ValueError(f"synonym key {word!r} must be one word")
            kept = [a.strip() for a in alternatives if a.strip() and a.strip().lower() != word.strip().lower()]
            if not kept:
                raise ValueError(f"synonyms[{word!r}] needs at least one alternative that differs from the word")
            out[word.strip().lower()] = kept
        return out

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, value: list[str]) -> list[str]:
        for template in value:
            if template.count("{instruction}") != 1 or template.strip() == "{instruction}":
                raise ValueError(f"template {template!r} must contain '{{instruction}}' exactly once, plus other words")
        return value

    def merged(self, other: ParaphraseRules) -> ParaphraseRules:
        """These rules extended by ``other`` (its synonyms win for the same word)."""
        return ParaphraseRules(synonyms={**self.synonyms, **other.synonyms},
                               templates=list(dict.fromkeys([*self.templates, *other.templates])))


#: Rules for common manipulation instructions (object and verb synonyms, polite templates).
DEFAULT_PARAPHRASE_RULES = ParaphraseRules(
    synonyms={
        "pick": ["grasp", "lift", "grab"],
        "grasp": ["pick", "grab"],
        "grab": ["grasp", "pick"],
        "put": ["place", "set"],
        "place": ["put", "set"],
        "move": ["push", "slide"],
        "push": ["move", "shove"],
        "block": ["cube"],
        "cube": ["block"],
        "cup": ["mug"],
        "mug": ["cup"],
        "bowl": ["dish"],
        "plate": ["dish"],
        "open": ["pull open"],
        "close": ["shut"],
        "shut": ["close"],
    },
    templates=["please {instruction}", "{instruction} now", "can you {instruction}", "your task: {instruction}"],
)


def load_paraphrase_rules(path: str | Path, base: ParaphraseRules | None = DEFAULT_PARAPHRASE_RULES) -> ParaphraseRules:
    """Read a JSON rules file (``{"synonyms": {...}, "templates": [...]}``) and extend ``base`` with it.

    :param path: the JSON file.
    :param base: rules to extend (the defaults); ``None`` uses only the file's rules.
    :raises AptConfigError: the file is missing, is not JSON, or breaks a rule (the field is named).
    """
    path = Path(path)
    field = "paraphrase_rules"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AptConfigError(field, str(path), "the file does not exist; pass a JSON file with "
                             '{"synonyms": {"word": ["alternative", ...]}, "templates": ["please {instruction}"]}.') from None
    except json.JSONDecodeError as exc:
        raise AptConfigError(field, str(path), f"the file is not valid JSON ({exc}).") from None
    try:
        rules = ParaphraseRules.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AptConfigError(f"{field}.{where}" if where else field, first.get("input"),
                             f"{first['msg'].removeprefix('Value error, ')} (in {path}).") from None
    return base.merged(rules) if base is not None else rules


_WORD = re.compile(r"[A-Za-z]+")


def paraphrase(instruction: str, rng: random.Random, rules: ParaphraseRules = DEFAULT_PARAPHRASE_RULES) -> str:
    """A paraphrase of ``instruction``: synonyms where the rules have them, else a template."""
    words = instruction.split()
    changed = False
    out = []
    for word in words:
        match = _WORD.fullmatch(word.strip(".,;:!?"))
        key = match.group(0).lower() if match else None
        if key in rules.synonyms:
            out.append(word.lower().replace(key, rng.choice(rules.synonyms[key])))
            changed = True
        else:
            out.append(word)
    text = " ".join(out)
    if changed and text != instruction:
        return text
    if rules.templates and instruction.strip():
        return rng.choice(rules.templates).replace("{instruction}", instruction.strip())
    return instruction


def shuffle_words(instruction: str, rng: random.Random) -> str:
    """The words of ``instruction`` in another order (unchanged only if no other order exists)."""
    words = instruction.split()
    if len(set(words)) < 2:
        return instruction
    for _ in range(10):
        shuffled = words[:]
        rng.shuffle(shuffled)
        if shuffled != words:
            return " ".join(shuffled)
    return " ".join(words[1:] + words[:1])  # a rotation always differs when two words differ


def swap_task(instruction: str, tasks: Sequence[str], rng: random.Random) -> str | None:
    """Another task of the same dataset, drawn by ``rng``; ``None`` when the dataset has no other task."""
    others = sorted({t for t in tasks if t.strip() != instruction.strip()})
    return rng.choice(others) if others else None


def corrupt(instruction: str, rng: random.Random, vocabulary: Sequence[str] | None = None) -> str:
    """As many random tokens as ``instruction`` has words (at least three).

    ``vocabulary`` is the policy tokenizer's plain tokens, so the corruption is made of tokens the
    model knows; without one, random lowercase strings are used.
    """
    n = max(3, len(instruction.split()))
    if vocabulary:
        words = [rng.choice(vocabulary) for _ in range(n)]
    else:
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n)]
    text = " ".join(words)
    return text if text != instruction else text + " " + words[0]


def make_variant(
    variant: str,
    instruction: str,
    rng: random.Random,
    tasks: Sequence[str] = (),
    rules: ParaphraseRules = DEFAULT_PARAPHRASE_RULES,
    vocabulary: Sequence[str] | None = None,
) -> str | None:
    """The ``variant`` of ``instruction``; ``None`` when it does not exist (``task_swap`` on one task).

    :param variant: one of :data:`VARIANTS`.
    :raises AptConfigError: an unknown variant.
    """
    if variant == "original":
        return instruction
    if variant == "task_swap":
        return swap_task(instruction, tasks, rng)
    if variant == "empty":
        return ""
    if variant == "shuffled":
        return shuffle_words(instruction, rng)
    if variant == "paraphrase":
        return paraphrase(instruction, rng, rules)
    if variant == "corrupted":
        return corrupt(instruction, rng, vocabulary)
    validate_variants([variant])
    raise AssertionError("unreachable")


def validate_variants(variants: Sequence[str] | None) -> tuple[str, ...]:
    """The variants to run, in report order, ``original`` always included.

    :raises AptConfigError: an unknown name (the known ones are listed).
    """
    if variants is None:
        return VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise AptConfigError("variants", unknown[0], f"choose from {', '.join(VARIANTS)}.")
    chosen = set(variants) | {"original"}
    return tuple(v for v in VARIANTS if v in chosen)
