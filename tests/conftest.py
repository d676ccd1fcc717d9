"""Test-wide settings: offline, deterministic, CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def use_offline_hub(monkeypatch, hub_cache):
    """Point huggingface_hub at a scratch hub cache (tokenizer/processor fixtures), offline."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def unit_stats(dim: int = 6) -> dict:
    """Dataset statistics that make normalisation the identity on [-1, 1] (every stat kind LeRobot reads)."""
    import torch

    def stats(n):
        return {"mean": torch.zeros(n), "std": torch.ones(n), "min": -torch.ones(n), "max": torch.ones(n),
                "q01": -torch.ones(n), "q99": torch.ones(n), "q10": -torch.ones(n), "q90": torch.ones(n)}

    return {"observation.state": stats(dim), "action": stats(dim)}
