"""APT inside openpi's own PyTorch trainer (``scripts/train_pytorch.py``), unmodified.

``apt-plugins openpi-train <config> [openpi flags] --apt.stage=1 ...`` runs openpi's ``main()``
(its ``TrainConfig`` registry, tyro flags, data loader, DDP, LR schedule, logging and checkpoint
layout) with four of its module-level lookups wrapped for the duration of the run:

- ``PI0Pytorch(model_cfg)``: the real constructor, then :func:`apt_plugins.prepare_stage` (the VLM
  frozen or LoRA'd, the masks and, in Stage 2, the fusion layers) before openpi moves the model
  to its device and wraps it in DDP;
- ``torch.optim.AdamW(model.parameters(), ...)``: AdamW over the adapter's parameter groups
  (trainable tensors only; VLM at ``vlm_lr_multiplier`` x lr, no decay on gates/norms), whose
  per-group multipliers survive openpi setting ``lr`` on every group at every step and a resume;
- ``safetensors.torch.load_model``: for ``--pytorch_weight_path`` and ``--resume``, the APT strict
  loader (a Stage-1 APT checkpoint loaded into Stage 2 is a promotion: only fusion tensors are new);
- ``safetensors.torch.save_model``: openpi's ``model.safetensors``, then ``apt_manifest.json`` and
  ``config.json`` in the same step directory (and the frozen-weight proof with ``apt.check_frozen``).

openpi's data module imports ``lerobot.common.datasets`` (a LeRobot git revision that is not on
PyPI) at module level, only for its LeRobot data configs. When that import fails, a placeholder
module stands in for it that raises on any use, so fake-data configs train and a LeRobot data
config fails with an explanation instead of an ImportError at startup.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

from apt_plugins import AptConfig, AptConfigError, AptError, apt_state, fingerprint, param_groups, prepare_stage

logger = logging.getLogger("apt_plugins")

__all__ = ["split_apt_args", "train_script_path", "run_openpi_train"]


def split_apt_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Separate ``--apt.<field>=<value>`` (or ``--apt.<field> <value>``) flags from openpi's own flags.

    Values are parsed as YAML scalars (``1``, ``true``, ``0.1``, ``[0, 1]``), then validated by
    :class:`AptConfig` (so a wrong field or value names itself and the fix).
    """
    import yaml

    apt: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--apt."):
            key, eq, value = arg[len("--apt."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise AptConfigError(f"apt.{key}", None, f"give a value: --apt.{key}=<value>.")
                value = argv[i + 1]
                i += 1
            apt[key.replace("-", "_")] = yaml.safe_load(value)
        else:
            rest.append(arg)
        i += 1
    return apt, rest


def train_script_path() -> Path:
    """openpi's ``scripts/train_pytorch.py``: ``APT_OPENPI_TRAIN_SCRIPT``, or the installed checkout's.

    :raises AptError: not found (openpi installed from a wheel without its scripts).
    """
    env = os.environ.get("APT_OPENPI_TRAIN_SCRIPT")
    if env:
        path = Path(env)
    else:
        import openpi

        path = Path(openpi.__file__).resolve().parents[2] / "scripts" / "train_pytorch.py"
    if not path.is_file():
        raise AptError(
            f"openpi-train: openpi's trainer script was not found at {path}. Install openpi editable from its "
            "checkout (pip install -e /path/to/openpi, as scripts/bootstrap_openpi.sh does) or set "
            "APT_OPENPI_TRAIN_SCRIPT=/path/to/openpi/scripts/train_pytorch.py."
        )
    return path


class _LeRobotDataUnavailable(types.ModuleType):
    """Stands in for ``lerobot.common.datasets.lerobot_dataset`` when that LeRobot revision is absent."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AptError(
            f"openpi-train: this openpi config reads a LeRobot dataset (lerobot_dataset.{name}), but the LeRobot "
            "revision openpi pins (git rev 0cf8648, lerobot.common.datasets) is not installed in this environment; "
            "only openpi's fake-data configs train here. Install it: pip install "
            "'lerobot @ git+https://github.com/huggingface/lerobot@0cf864870cf29f4738d3ade893e6fd13fbd7cdb5'."
        )


def _ensure_lerobot_data_module() -> None:
    name = "lerobot.common.datasets.lerobot_dataset"
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub in sys.modules:
            continue
        try:
            importlib.import_module(sub)
        except ImportError:
            module = _LeRobotDataUnavailable(sub) if i == len(parts) else types.ModuleType(sub)
            module.__path__ = []  # a package, so the next level can be looked up
            sys.modules[sub] = module
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], module)


def _load_train_module() -> types.ModuleType:
    path = train_script_path()
    _ensure_lerobot_data_module()
    spec = importlib.util.spec_from_file_location("openpi_train_pytorch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Run:
    """The state shared by the wrapped lookups during one ``openpi-train`` run."""

    def __init__(self, apt: AptConfig):
        self.apt = apt
        self.model: Any = None
        self.frozen: dict[str, str] | None = None

    # -------------------------------------------------------------- PI0Pytorch(model_cfg)
    def build(self, real_cls: type):
        def factory(model_cfg: Any, *args: Any, **kwargs: Any) -> Any:
            model = real_cls(model_cfg, *args, **kwargs)
            adapter = "openpi_pi05" if model.pi05 else "openpi_pi0"
            report = prepare_stage(model, self.apt, adapter=adapter)
            logger.info("APT openpi-train\n%s", report.format_table())
            if self.apt.check_frozen:
                self.frozen = fingerprint(model, frozen_only=True)
                logger.info("APT check_frozen: fingerprinted %d frozen tensors", len(self.frozen))
            self.model = model
            return model

        return factory

    # -------------------------------------------------------------- torch.optim.AdamW(...)
    def adamw(self, real_cls: type):
        run = self

        class _ScaledGroup(dict):
            """A parameter group whose ``lr`` is always ``lr_scale`` x the value openpi sets."""

            def __setitem__(self, key: str, value: Any) -> None:
                if key == "lr":
                    value = value * self.get("lr_scale", 1.0)
                super().__setitem__(key, value)

        class AptAdamW(real_cls):
            def __init__(self, params: Any, lr: float = 1e-3, **kwargs: Any):
                model = run.model
                if model is None or apt_state(model) is None:  # not the model openpi-train built
                    super().__init__(params, lr=lr, **kwargs)
                    return
                groups = []
                for group in param_groups(model, base_lr=lr, weight_decay=kwargs.get("weight_decay", 0.0)):
                    g = _ScaledGroup(group)
                    dict.__setitem__(g, "lr_scale", group["lr"] / lr if lr else 1.0)
                    groups.append(g)
                super().__init__(groups, lr=lr, **kwargs)
                logger.info("APT optimizer groups: %s", ", ".join(
                    f"{g['name']} ({sum(p.numel() for p in g['params']):,} params, lr x{g['lr_scale']:g}, "
                    f"wd {g['weight_decay']:g})" for g in self.param_groups))

            def load_state_dict(self, state_dict: dict[str, Any]) -> None:
                scales = [g.get("lr_scale", 1.0) for g in self.param_groups]
                super().load_state_dict(state_dict)
                # torch rebuilds the groups as plain dicts: restore the per-group lr multipliers.
                self.param_groups[:] = [
                    _ScaledGroup({**g, "lr_scale": s}) for g, s in zip(self.param_groups, scales, strict=True)]

        return AptAdamW

    # -------------------------------------------------------------- safetensors load/save
    def load_model(self, real_load: Any):
        def load_model(model: Any, filename: Any, strict: bool = True, device: str = "cpu") -> Any:
            if apt_state(model) is None:
                return real_load(model, filename, strict=strict, device=device)
            from .checkpoints import load_into

            load_into(model, Path(filename).parent, device=device)
            return [], []

        return load_model

    def save_model(self, real_save: Any):
        def save_model(model: Any, filename: Any, metadata: Any = None, force_contiguous: bool = False) -> None:
            if apt_state(model) is not None and self.frozen is not None:
                self.verify_frozen(model)
            real_save(model, filename, metadata=metadata, force_contiguous=force_contiguous)
            if apt_state(model) is not None:
                from .checkpoints import write_apt_files

                manifest = write_apt_files(model, Path(filename).parent, frozen_checked=len(self.frozen or {}))
                gates = {k: round(v, 4) for k, v in _gate_means(model).items()}
                logger.info("APT checkpoint %s: stage %d%s", Path(filename).parent, manifest["stage"],
                            f", gate means {gates}" if gates else "")

        return save_model

    def verify_frozen(self, model: Any) -> None:
        now = fingerprint(model, names=self.frozen)
        changed = sorted(n for n, h in self.frozen.items() if now.get(n) != h)
        if changed:
            raise AptError(
                f"APT check_frozen: {len(changed)} frozen tensors changed since training started (e.g. "
                f"{', '.join(changed[:3])}); the checkpoint was not written. Something outside APT trains them."
            )


def _gate_means(model: Any) -> dict[str, float]:
    from apt_plugins import gate_statistics

    return {k.removeprefix("apt/gate_mean/"): v for k, v in gate_statistics(model).items() if "gate_mean" in k}


def run_openpi_train(config_name: str, openpi_args: list[str], apt: AptConfig | dict[str, Any]) -> int:
    """Run openpi's ``train_pytorch.main()`` for ``config_name`` with APT ``apt`` (module docstring).

    :param openpi_args: openpi's own tyro flags (``--exp_name``, ``--pytorch_weight_path``, ...).
    :raises AptConfigError: an invalid APT setting (before anything runs).
    """
    import safetensors.torch
    import torch
    from openpi.models_pytorch import pi0_pytorch

    from . import modeling  # noqa: F401 - imports the real PI0Pytorch before it is wrapped

    apt = AptConfig.parse(apt)
    run = _Run(apt)
    train = _load_train_module()
    argv = [str(train.__file__), config_name, *openpi_args]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(pi0_pytorch, "PI0Pytorch", run.build(pi0_pytorch.PI0Pytorch)))
        stack.enter_context(_replaced(torch.optim, "AdamW", run.adamw(torch.optim.AdamW)))
        stack.enter_context(_replaced(safetensors.torch, "load_model", run.load_model(safetensors.torch.load_model)))
        stack.enter_context(_replaced(safetensors.torch, "save_model", run.save_model(safetensors.torch.save_model)))
        stack.enter_context(_replaced(sys, "argv", argv))
        train.main()
    return 0


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any):
    """``owner.name = value`` for the duration of the block (openpi looks these up at call time)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
