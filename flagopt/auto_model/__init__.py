"""Load OPT models by name: ``AutoLoader`` (FlagAI's API), the model registry and fetching."""

from flagopt.auto_model.auto_loader import AutoLoader
from flagopt.auto_model.fetch import (download_model, flagopt_home, model_local_dir,
                                      probe_weight_files)
from flagopt.auto_model.registry import (ModelSpec, config_for, get_model_spec, list_models,
                                         load_registry, resolve_model)

__all__ = [
    "AutoLoader",
    "ModelSpec",
    "config_for",
    "download_model",
    "flagopt_home",
    "get_model_spec",
    "list_models",
    "load_registry",
    "model_local_dir",
    "probe_weight_files",
    "resolve_model",
]
