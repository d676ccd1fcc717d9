"""The open-loop runner: dataset frames, counterfactual instructions, the policy's own processors.

For each sampled frame and each instruction variant, the frame goes through the checkpoint's own
pre-processor with the changed ``task`` string (so the tokens really change), then through
``predict_action_chunk`` with the sampling noise fixed by the seed (so the instruction is the only
difference between variants), then through the post-processor (dataset units). The tokens the
policy was called with are recorded at the call and compared with the original's: a changed
instruction that produced the original's tokens raises :class:`InstructionNotDeliveredError`.
"""

from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import AptConfigError, InstructionNotDeliveredError, NoLanguageInputError
from .metrics import action_scale, aggregate, follow_score, mean_or_none, normalised_rms
from .report import SCHEMA_VERSION, LanguageReport
from .variants import DEFAULT_PARAPHRASE_RULES, MEANING_CHANGING, ParaphraseRules, make_variant, validate_variants

__all__ = ["evaluate_language", "LoadedPolicy", "load_policy", "language_keys", "token_signature", "record_policy_inputs"]

# The probe instruction that finds the language inputs: words no dataset task is likely to be.
_PROBE_INSTRUCTION = "zq xv unrelated probe words"


@dataclass
class LoadedPolicy:
    """A policy with the processors that belong to it, and how to name it in a report."""

    policy: Any
    preprocessor: Any
    postprocessor: Any
    name: str
    source: str | None


def load_policy(path: str | Path, device: str = "cpu") -> LoadedPolicy:
    """Load a LeRobot checkpoint (any type, stock or ``apt_*``) with its own saved processors.

    :raises AptConfigError: ``path`` is not a LeRobot ``pretrained_model`` directory.
    """
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    from .. import register_lerobot_types
    from ..policy import resolve_checkpoint_dir

    register_lerobot_types()
    directory = resolve_checkpoint_dir(path)
    if not (Path(directory) / "config.json").is_file():
        raise AptConfigError("policy.path", str(path), "expected a LeRobot pretrained_model directory "
                             "(config.json, model.safetensors and the processor files).")
    config = PreTrainedConfig.from_pretrained(directory)
    config.device = device
    policy = get_policy_class(config.type).from_pretrained(directory, config=config)
    overrides = {"device_processor": {"device": device}}
    try:
        pre, post = make_pre_post_processors(config, pretrained_path=str(directory),
                                             preprocessor_overrides=overrides)
    except (FileNotFoundError, OSError) as exc:
        raise AptConfigError("policy.path", str(path), f"the checkpoint's processors cannot be loaded ({exc}); "
                             "save the checkpoint with lerobot-train, which writes them next to the weights.") from None
    return LoadedPolicy(policy, pre, post, name=checkpoint_name(path), source=str(directory))


def checkpoint_name(path: str | Path) -> str:
    """A short name for a checkpoint: the run directory, not ``checkpoints/last/pretrained_model``."""
    parts = Path(str(path)).parts
    for part in reversed(parts):
        if part not in ("pretrained_model", "checkpoints", "last", "/") and not part.isdigit():
            return part
    return str(path)


def check_device(device: str) -> str:
    """``device`` if torch can use it here.

    :raises AptConfigError: an unknown device string, or a CUDA/MPS device this machine does not have.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise AptConfigError("policy.device", device, "use cpu, cuda, cuda:<index> or mps.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise AptConfigError("policy.device", device, "CUDA is not available on this machine; use --policy.device=cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise AptConfigError("policy.device", device, f"this machine has {torch.cuda.device_count()} CUDA device(s).")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise AptConfigError("policy.device", device, "MPS is not available on this machine; use --policy.device=cpu.")
    return device


def _as_loaded(policy_or_path: Any, dataset_stats: Any, device: str, preprocessor: Any, postprocessor: Any,
               name: str | None) -> LoadedPolicy:
    if isinstance(policy_or_path, LoadedPolicy):
        return policy_or_path
    if isinstance(policy_or_path, (str, Path)):
        loaded = load_policy(policy_or_path, device=device)
        if name:
            loaded.name = name
        return loaded
    from lerobot.policies.factory import make_pre_post_processors

    policy = policy_or_path
    if preprocessor is None or postprocessor is None:
        pre, post = make_pre_post_processors(policy.config, dataset_stats=dataset_stats)
        preprocessor, postprocessor = preprocessor or pre, postprocessor or post
    return LoadedPolicy(policy, preprocessor, postprocessor, name=name or getattr(policy, "name", type(policy).__name__),
                        source=None)


# ------------------------------------------------------------------------------- language inputs
def language_keys(preprocessor: Any, raw: dict[str, Any], instruction_sets: list[list[str]]) -> list[str]:
    """The batch keys the pre-processor derives from the instruction (found by changing only it)."""
    import torch

    outputs = [preprocessor({**raw, "task": list(tasks)}) for tasks in instruction_sets]
    candidates = {k for out in outputs for k, v in out.items() if isinstance(v, torch.Tensor)}
    keys = []
    for key in sorted(candidates):
        values = [out.get(key) for out in outputs]
        first = values[0]
        if any(not isinstance(v, torch.Tensor) or not isinstance(first, torch.Tensor) or v.shape != first.shape
               or not torch.equal(v, first) for v in values[1:]):
            keys.append(key)
    return keys


def token_signature(inputs: dict[str, Any], keys: list[str], row: int) -> tuple:
    """What sample ``row`` saw of the language inputs: its token ids (padding removed) per key."""
    masks = {k: inputs[k] for k in keys if "attention_mask" in k and k in inputs}
    out = []
    for key in keys:
        if key not in inputs or key in masks:
            continue
        value = inputs[key][row]
        mask = next((m[row] for m in masks.values() if m.shape == inputs[key].shape), None)
        if mask is not None:
            value = value[mask.bool()]
        out.append((key, tuple(value.reshape(-1).tolist())))
    return tuple(out)


@contextlib.contextmanager
def record_policy_inputs(policy: Any, keys: list[str], methods: tuple[str, ...] = ("predict_action_chunk",)):
    """Record the ``keys`` of every batch the policy's ``methods`` are called with (the tokens it saw).

    The wrapper is an instance attribute, so the class and every other instance are untouched.
    """
    seen: list[dict[str, Any]] = []
    previous: dict[str, Any] = {}
    for name in methods:
        previous[name] = policy.__dict__.get(name)
        bound = getattr(policy, name)

        def wrapper(batch: dict[str, Any], *args: Any, _bound: Any = bound, **kwargs: Any):
            seen.append({k: batch[k].detach().cpu().clone() for k in keys if k in batch})
            return _bound(batch, *args, **kwargs)

        setattr(policy, name, wrapper)
    try:
        yield seen
    finally:
        for name, value in previous.items():
            if value is None:
                policy.__dict__.pop(name, None)
            else:
                setattr(policy, name, value)


def tokenizer_vocabulary(preprocessor: Any, limit: int = 2000) -> list[str]:
    """Plain (non-special) tokens of the pre-processor's tokenizer, for the ``corrupted`` variant."""
    for step in getattr(preprocessor, "steps", []):
        tok = getattr(step, "input_tokenizer", None) or getattr(step, "tokenizer", None)
        if tok is None and hasattr(step, "processor"):
            tok = getattr(step.processor, "tokenizer", None)
        if tok is None or not hasattr(tok, "get_vocab"):
            continue
        special = set(getattr(tok, "all_special_tokens", []))
        words = sorted(w for w in tok.get_vocab() if w not in special and w.isalpha() and w.isascii()
                       and not w.startswith("<") and len(w) > 1)
        return words[:limit]
    return []


# ------------------------------------------------------------------------------------- dataset
def _dataset_id(dataset: Any, root: str | Path | None) -> tuple[str, str | Path | None]:
    if isinstance(dataset, (str, Path)):
        return str(dataset), root
    return dataset.repo_id, root or dataset.root


def _dataset_meta(dataset: Any, root: str | Path | None):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    return LeRobotDatasetMetadata(*_dataset_id(dataset, root))


def _open_dataset(dataset: Any, root: str | Path | None, chunk: int):
    """The dataset with ``chunk`` future actions per frame (the ground-truth chunk)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    repo_id, root = _dataset_id(dataset, root)
    meta = _dataset_meta(repo_id, root)
    return LeRobotDataset(repo_id, root=root, delta_timestamps={"action": [i / meta.fps for i in range(chunk)]})


def _sample_frames(ds: Any, frames: int, pool_per_task: int, seed: int) -> tuple[list[int], dict[int, list[int]]]:
    """Evaluation frames round-robin over tasks and their episodes, and a matching pool per task."""
    columns = ds.hf_dataset.select_columns(["episode_index", "task_index"])
    episodes = [int(x) for x in columns["episode_index"]]
    task_ids = [int(x) for x in columns["task_index"]]
    by_task: dict[int, dict[int, list[int]]] = {}
    for index, (episode, task) in enumerate(zip(episodes, task_ids, strict=True)):
        by_task.setdefault(task, {}).setdefault(episode, []).append(index)
    rng = random.Random(seed)
    order = {t: sorted(eps) for t, eps in by_task.items()}
    picks: list[int] = []
    round_ = 0
    total = len(episodes)
    while len(picks) < min(frames, total):
        added = False
        for task in sorted(order):
            eps = order[task]
            episode = eps[round_ % len(eps)]
            candidates = [i for i in by_task[task][episode] if i not in picks]
            if candidates and len(picks) < frames:
                picks.append(rng.choice(candidates))
                added = True
        round_ += 1
        if not added and round_ > total:
            break
    pool: dict[int, list[int]] = {}
    for task, eps in by_task.items():
        indices = sorted(i for frames_ in eps.values() for i in frames_)
        step = max(1, len(indices) // pool_per_task)
        pool[task] = indices[::step][:pool_per_task]
    return picks, pool


def _observation_features(item: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v.float().reshape(-1) for k, v in item.items()
            if k.startswith("observation.") and isinstance(v, torch.Tensor) and v.is_floating_point()}


def _nearest(query: dict[str, Any], candidates: list[tuple[int, dict[str, Any]]], spreads: dict[str, float]) -> int:
    """The candidate closest to ``query``: every observation key weighs the same (mean squared, per spread)."""
    best, best_d = candidates[0][0], float("inf")
    for index, feats in candidates:
        d = sum(float(((query[k] - feats[k]) ** 2).mean()) / spreads[k] for k in query if k in feats)
        if d < best_d:
            best, best_d = index, d
    return best


def _raw_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The observation keys of dataset items, stacked (no action: the policy predicts it)."""
    import torch

    raw: dict[str, Any] = {}
    for key, value in items[0].items():
        if key.startswith("observation.") and isinstance(value, torch.Tensor):
            stacked = torch.stack([it[key] for it in items])
            raw[key] = stacked.float() / 255 if stacked.dtype == torch.uint8 else stacked
    return raw


def _run_variants(loaded: LoadedPolicy, raw: dict[str, Any], texts: dict[str, list[str]], keys: list[str],
                  device: str, noise_seed: int) -> dict[str, tuple[Any, list[tuple]]]:
    """Post-processed action chunks and per-sample token signatures, per variant (plus ``reference``).

    Every pass seeds the sampling noise identically, so the instruction is the only difference.
    """
    import torch

    out: dict[str, tuple[Any, list[tuple]]] = {}
    rows = len(next(iter(texts.values())))
    # The first pass is the reference every variant is compared with; "original" re-runs it.
    for label, variant in (("reference", "original"), *((v, v) for v in texts)):
        batch = loaded.preprocessor({**raw, "task": list(texts[variant])})
        obs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
               if k not in ("action", "action_is_pad")}
        with record_policy_inputs(loaded.policy, keys) as seen, torch.no_grad():
            torch.manual_seed(noise_seed)
            loaded.policy.reset()
            predicted = loaded.policy.predict_action_chunk(obs)
        actions = loaded.postprocessor(predicted).detach().float().cpu().numpy()
        out[label] = (actions, [token_signature(seen[-1], keys, j) for j in range(rows)])
    return out


class _SwapMatcher:
    """The swapped task's ground truth of a frame: the nearest frame of that task (all observation keys)."""

    def __init__(self, ds: Any, pool: dict[int, list[int]], task_ids: dict[str, int]):
        import torch

        self.ds = ds
        self.task_ids = task_ids
        self.pool = {t: [(i, _observation_features(ds[i])) for i in idx] for t, idx in pool.items()}
        every = [f for rows in self.pool.values() for _, f in rows]
        self.spreads = {key: max(float(torch.stack([f[key] for f in every]).var(dim=0).mean()), 1e-12)
                        for key in every[0]}

    def __call__(self, item: dict[str, Any], task: str) -> tuple[int, Any]:
        index = _nearest(_observation_features(item), self.pool[self.task_ids[task]], self.spreads)
        return index, self.ds[index]["action"].float().numpy()


def _frame_record(item: dict[str, Any], index: int, row: int, original: str, texts: dict[str, list[str]],
                  outputs: dict[str, tuple[Any, list[tuple]]], scale: Any, matcher: _SwapMatcher | None) -> dict:
    """One frame's record (``frames[]`` in the JSON report), after the token-delivery check."""
    base_actions, base_signatures = outputs["reference"]
    gt = item["action"].float().numpy()
    valid = ~item["action_is_pad"].numpy() if "action_is_pad" in item else None
    steps, dims = min(gt.shape[0], base_actions.shape[1]), min(gt.shape[-1], base_actions.shape[-1])
    gt, scale = gt[:steps, :dims], scale[:dims]
    valid = valid[:steps] if valid is not None else None
    base = base_actions[row, :steps, :dims]
    record: dict[str, Any] = {"index": int(index), "episode": int(item["episode_index"]), "task": original,
                              "instructions": {}, "divergence": {}, "gt_error": {}, "gt_error_swap": {},
                              "tokens_changed": {}}
    gt_swap = None
    if matcher is not None:
        record["swap_match_index"], gt_swap = matcher(item, texts["task_swap"][row])
        gt_swap = gt_swap[:steps, :dims]
    for variant, variant_texts in texts.items():
        text = variant_texts[row]
        actions, signatures = outputs[variant]
        changed = signatures[row] != base_signatures[row]
        if text.strip() != original.strip() and not changed:
            raise InstructionNotDeliveredError(
                variant, original, text, f"dataset frame {index}",
                "The pre-processor maps both to the same tokens: the instruction may be truncated "
                "(raise the tokenizer's max length) or made only of unknown words (extend the "
                "paraphrase rules with words the tokenizer knows).")
        a = actions[row, :steps, :dims]
        record["instructions"][variant] = text
        record["tokens_changed"][variant] = bool(changed)
        record["divergence"][variant] = normalised_rms(a, base, scale, valid)
        record["gt_error"][variant] = normalised_rms(a, gt, scale, valid)
        if gt_swap is not None:
            record["gt_error_swap"][variant] = normalised_rms(a, gt_swap, scale, valid)
    if gt_swap is not None:
        record["follow"] = follow_score(base, outputs["task_swap"][0][row, :steps, :dims], gt, gt_swap, scale, valid)
    return record


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    # Off by default when stderr is not a terminal, so CI logs get no progress lines.
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, disable=disable, leave=False, mininterval=1.0)


# -------------------------------------------------------------------------------------- runner
def evaluate_language(
    policy_or_path: Any,
    dataset: Any,
    *,
    frames: int = 16,
    variants: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    device: str = "cpu",
    dataset_root: str | Path | None = None,
    batch_size: int = 8,
    paraphrase_rules: ParaphraseRules | str | Path | None = None,
    preprocessor: Any = None,
    postprocessor: Any = None,
    pool_per_task: int = 32,
    progress: bool | None = None,
    name: str | None = None,
) -> LanguageReport:
    """Measure how much a LeRobot policy follows its instruction on dataset frames (open loop).

    :param policy_or_path: a checkpoint directory (``pretrained_model``; its own processors are
        used), a policy object (processors built from its config and the dataset statistics unless
        given), or a :class:`LoadedPolicy`.
    :param dataset: a ``LeRobotDataset`` or a repo id (with ``dataset_root`` for a local one).
    :param frames: how many frames to evaluate, sampled round-robin over tasks and episodes.
    :param variants: instruction variants (default: all of :data:`VARIANTS`; ``original`` is
        always run).
    :param seed: fixes the frame sample, the variant texts and the sampling noise.
    :param device: where the policy runs (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
    :param batch_size: frames per forward pass.
    :param paraphrase_rules: extra paraphrase rules (a :class:`ParaphraseRules` or a JSON file),
        added to the defaults.
    :param pool_per_task: frames per task searched for the swapped task's ground truth.
    :param progress: show a progress bar over frames (default: only on a terminal).
    :param name: the policy's name in tables and plots.
    :returns: a :class:`LanguageReport` (``.to_dict()``, ``.write_json()``, ``.format_table()``,
        ``.save_plots()``).
    :raises NoLanguageInputError: the policy's pre-processor turns no instruction into inputs (ACT).
    :raises InstructionNotDeliveredError: a changed instruction reached the policy as the original's tokens.
    :raises AptConfigError: a bad argument (the field, the value and the fix are named).
    """
    import numpy as np

    if frames < 1:
        raise AptConfigError("frames", frames, "evaluate at least one frame.")
    if batch_size < 1:
        raise AptConfigError("batch_size", batch_size, "use a positive batch size.")
    chosen = validate_variants(variants)
    check_device(device)
    rules = DEFAULT_PARAPHRASE_RULES
    if isinstance(paraphrase_rules, ParaphraseRules):
        rules = rules.merged(paraphrase_rules)
    elif paraphrase_rules is not None:
        from .variants import load_paraphrase_rules

        rules = load_paraphrase_rules(paraphrase_rules)

    stats = None
    if not isinstance(policy_or_path, (str, Path, LoadedPolicy)):
        stats = _dataset_meta(dataset, dataset_root).stats
    loaded = _as_loaded(policy_or_path, stats, device, preprocessor, postprocessor, name)
    policy = loaded.policy
    policy.to(device)
    policy.eval()
    config = policy.config
    chunk = int(getattr(config, "chunk_size", None) or getattr(config, "n_action_steps", 1))
    ds = _open_dataset(dataset, dataset_root, chunk)
    tasks_table = ds.meta.tasks
    task_names = {int(row): str(task) for task, row in zip(tasks_table.index, tasks_table["task_index"], strict=True)}
    all_tasks = sorted(task_names.values())
    scale = action_scale(np.asarray(ds.meta.stats["action"]["std"]))

    picks, pool = _sample_frames(ds, frames, pool_per_task, seed)
    items = [ds[i] for i in picks]
    skipped: dict[str, str] = {}
    if "task_swap" in chosen and len(all_tasks) < 2:
        skipped["task_swap"] = "the dataset has one task; there is no other task to swap in"
        chosen = tuple(v for v in chosen if v != "task_swap")

    # The language inputs: what changes in the processed batch when only the instruction changes.
    first = str(items[0]["task"])
    keys = language_keys(loaded.preprocessor, _raw_batch(items[:1]), [[first], [""], [_PROBE_INSTRUCTION]])
    if not keys:
        raise NoLanguageInputError(
            repr(getattr(config, "type", type(policy).__name__)),
            f"its pre-processor produced the same model inputs for {first!r}, '' and {_PROBE_INSTRUCTION!r}.",
        )
    vocabulary = tokenizer_vocabulary(loaded.preprocessor)
    matcher = _SwapMatcher(ds, pool, {v: k for k, v in task_names.items()}) if "task_swap" in chosen else None

    records: list[dict[str, Any]] = []
    bar = _progress(len(items), f"eval-language {loaded.name}", progress)
    try:
        for start in range(0, len(items), batch_size):
            batch_items = items[start:start + batch_size]
            indices = picks[start:start + batch_size]
            originals = [str(it["task"]) for it in batch_items]
            texts = {variant: [make_variant(variant, text, random.Random(f"{seed}:{index}:{variant}"), all_tasks,
                                            rules, vocabulary) for index, text in zip(indices, originals, strict=True)]
                     for variant in chosen}
            outputs = _run_variants(loaded, _raw_batch(batch_items), texts, keys, device,
                                    noise_seed=seed * 100_003 + start)
            for j, item in enumerate(batch_items):
                records.append(_frame_record(item, indices[j], j, originals[j], texts, outputs, scale, matcher))
            bar.update(len(batch_items))
    finally:
        bar.close()

    per_variant, per_task = aggregate(records, chosen)
    changing = [per_variant[v]["divergence_mean"] for v in MEANING_CHANGING if v in per_variant]
    summary = {
        "instruction_following_index": mean_or_none(r.get("follow") for r in records),
        "sensitivity": mean_or_none(changing),
        "paraphrase_divergence": per_variant.get("paraphrase", {}).get("divergence_mean"),
        "noise_check": per_variant["original"]["divergence_max"],
    }
    return LanguageReport(
        schema_version=SCHEMA_VERSION,
        policy={"name": loaded.name, "type": getattr(config, "type", None), "source": loaded.source,
                "language_keys": keys},
        dataset={"repo_id": ds.repo_id, "root": str(ds.root), "tasks": all_tasks, "fps": ds.meta.fps,
                 "action_scale": [float(x) for x in scale]},
        settings={"frames": len(records), "seed": seed, "device": device, "batch_size": batch_size,
                  "variants": list(chosen), "chunk_size": chunk, "pool_per_task": pool_per_task},
        summary=summary,
        per_variant=per_variant,
        per_task=per_task,
        skipped=skipped,
        frames=records,
    )
