"""The openpi half of tests/test_convert.py, run with .venv-openpi/bin/python (not collected by pytest).

``python openpi_convert_worker.py JOB.json``: for every case, load the checkpoint converted from
LeRobot into openpi's real ``PI0Pytorch`` (strictly: the APT loader, or openpi's own
``safetensors.torch.load_model`` for a stock one), sample actions and compute the training loss on
the shared inputs; then build an openpi-born model of the same config, open its APT layers, save
it the way openpi does and record its outputs for the LeRobot side to compare.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, load_model, save_file

from apt_plugins import AptConfig, prepare_stage
from apt_plugins_openpi_pi.checkpoints import load_checkpoint, model_config_from, save_checkpoint
from apt_plugins_openpi_pi.modeling import set_state_marker
from apt_plugins_openpi_pi.testing import tiny_openpi_patches


def open_apt_layers(model: torch.nn.Module, seed: int) -> None:
    """Make the fusion layers and LoRA matter (fresh ones are exact no-ops), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("gate.logit"):
                p.fill_(2.0)
            elif ".apt_fusion." in name or "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def outputs(model, inputs: dict[str, torch.Tensor], keys: list[str], steps: int) -> dict[str, torch.Tensor]:
    from openpi.models.model import Observation

    obs = Observation.from_dict({
        "image": {k: inputs[f"image.{k}"] for k in keys}, "image_mask": {k: inputs[f"image_mask.{k}"] for k in keys},
        "state": inputs["state"], "tokenized_prompt": inputs["tokens"], "tokenized_prompt_mask": inputs["masks"]})
    model.eval()
    with torch.no_grad():
        actions = model.sample_actions(torch.device("cpu"), obs, noise=inputs["noise"].clone(), num_steps=steps)
        # openpi's forward augments images in training (random crop/rotation/colour); LeRobot's model does
        # not, so the loss is compared with openpi's eval preprocessing (train=False).
        preprocess = model._preprocess_observation
        model._preprocess_observation = lambda o, train=True: preprocess(o, train=False)
        try:
            loss = model(obs, inputs["actions"], inputs["noise"].clone(), inputs["time"])
        finally:
            del model._preprocess_observation
    return {"actions": actions.contiguous(), "loss": loss.contiguous()}


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    inputs = load_file(job["inputs"])
    from openpi.models_pytorch.pi0_pytorch import PI0Pytorch

    def construct(cfg):
        with tiny_openpi_patches(**job["sizes"]):
            model = PI0Pytorch(cfg)
        set_state_marker(model, job["marker"])
        return model

    results: dict[str, torch.Tensor] = {}
    for case in job["cases"]:
        name, apt = case["name"], case["apt"]
        cfg = model_config_from(case["converted"])  # the Pi0Config mapped from LeRobot's config.json
        if apt is None:
            model = construct(cfg)
            missing, unexpected = load_model(model, f"{case['converted']}/model.safetensors", strict=True)
            assert not missing and not unexpected, (missing, unexpected)
        else:
            model = load_checkpoint(case["converted"], apt, build=construct)
            assert not model.apt_load_report.fresh, model.apt_load_report.fresh
        for k, v in outputs(model, inputs, job["image_keys"], job["steps"]).items():
            results[f"{name}/converted/{k}"] = v
        torch.manual_seed(case["seed"])
        born = construct(cfg)
        if apt is not None:
            prepare_stage(born, AptConfig.parse(apt), adapter="openpi_pi05" if cfg.pi05 else "openpi_pi0")
            open_apt_layers(born, case["seed"])
        save_checkpoint(born, case["born"])
        for k, v in outputs(born, inputs, job["image_keys"], job["steps"]).items():
            results[f"{name}/born/{k}"] = v
    save_file(results, job["results"])


if __name__ == "__main__":
    main(sys.argv[1])
