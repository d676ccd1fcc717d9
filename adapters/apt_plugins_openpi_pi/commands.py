"""The openpi halves of ``apt-plugins openpi-train`` and ``apt-plugins retrofit --openpi-config``."""

from __future__ import annotations

import argparse
from typing import Any

from apt_plugins import AptConfig, AptError

__all__ = ["train_command", "retrofit_command", "openpi_model_config"]


def train_command(args: argparse.Namespace) -> int:
    """``apt-plugins openpi-train CONFIG [openpi flags] --apt.<field>=<value>``."""
    from .train import run_openpi_train, split_apt_args

    apt, openpi_args = split_apt_args(list(args.args or []))
    if "stage" not in apt:
        raise AptError("openpi-train: give the APT stage, --apt.stage=1 or --apt.stage=2 (docs/openpi.md).")
    return run_openpi_train(args.config, openpi_args, AptConfig.parse(apt, prefix="apt"))


def openpi_model_config(name: str) -> Any:
    """The ``Pi0Config`` of openpi's ``TrainConfig`` named ``name``.

    :raises AptError: unknown config name, or not a pi0/pi0.5 model.
    """
    from .train import _ensure_lerobot_data_module

    _ensure_lerobot_data_module()
    from openpi.models.pi0_config import Pi0Config
    from openpi.training import config as openpi_config

    try:
        model = openpi_config.get_config(name).model
    except ValueError as exc:
        raise AptError(f"--openpi-config={name!r}: {exc}") from None
    if not isinstance(model, Pi0Config):
        raise AptError(f"--openpi-config={name!r} is a {type(model).__name__} model; APT supports pi0/pi0.5 (Pi0Config).")
    return model


def retrofit_command(args: argparse.Namespace) -> int:
    """``apt-plugins retrofit SRC OUT --stage N --openpi-config NAME``: plain openpi checkpoint -> APT."""
    import torch

    from .checkpoints import retrofit_checkpoint
    from .testing import make_batch, observation

    import dataclasses

    # fp32 and no torch.compile: retrofit only moves tensors (openpi casts on load to its training
    # precision), and the probe must compare the two models exactly, not autotune kernels.
    model_config = dataclasses.replace(openpi_model_config(args.openpi_config), dtype="float32",
                                       pytorch_compile_mode=None)
    overrides: dict[str, Any] = {"stage": args.stage}
    if args.keep_language_paths:
        overrides["inherited_layers_keep_language_mask"] = False
    if args.vlm_mode:
        overrides["vlm_mode"] = args.vlm_mode
    apt = AptConfig.parse(overrides, prefix="apt")
    torch.manual_seed(args.seed)
    model = retrofit_checkpoint(args.src, args.out, apt, model_config, reinit_expert=args.reinit_expert)
    print(model.apt_load_report.summary())
    print(f"wrote {args.out} (APT stage {apt.stage}, openpi layout: model.safetensors + apt_manifest.json)")
    if args.no_probe or not (apt.stage == 2 and not apt.inherited_layers_keep_language_mask):
        return 0
    # --keep-language-paths: the retrofit must reproduce the source's actions on a probe batch.
    from openpi.models_pytorch.pi0_pytorch import PI0Pytorch
    from safetensors.torch import load_model

    source = PI0Pytorch(model_config)
    load_model(source, f"{args.src}/model.safetensors")
    batch = make_batch(model_config, seed=args.seed)
    got = []
    for m in (source.eval(), model.eval()):
        torch.manual_seed(args.seed)
        got.append(m.sample_actions(torch.device("cpu"), observation(batch), num_steps=2))
    diff = float((got[0] - got[1]).abs().max())
    scale = float(got[0].abs().max()) or 1.0
    print(f"probe: max |actions(source) - actions(retrofit)| = {diff:.3g}")
    if diff > 1e-4 * scale:
        raise AptError(f"retrofit: the Stage-2 checkpoint does not reproduce {args.src} (max |diff| {diff:.3g}); "
                       f"{args.out} was written but should not be used. Please report this.")
    return 0
