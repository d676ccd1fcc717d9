"""DeepSpeed for APT (needs ``pip install 'apt-plugins[deepspeed]'``).

- :mod:`apt_plugins.deepspeed.config`: the shipped recipes, their validation and ``"auto"`` filling.
- :mod:`apt_plugins.deepspeed.train`: the training entry point, launched with ``deepspeed``,
  ``torchrun`` or ``accelerate launch`` (``python -m apt_plugins.deepspeed.train``).
"""

from .config import PRECISIONS, load_recipe, recipe_names, resolve_recipe, validate_recipe

__all__ = ["PRECISIONS", "load_recipe", "recipe_names", "resolve_recipe", "validate_recipe"]
