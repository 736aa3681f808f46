"""Load OPT models by name: ``AutoLoader`` (FlagAI's API) and the model registry."""

from flagopt.auto_model.auto_loader import (AutoLoader, download_model, flagopt_home,
                                            model_local_dir)
from flagopt.auto_model.registry import (ModelSpec, get_model_spec, list_models, load_registry,
                                         probe_weight_files, resolve_model)

__all__ = [
    "AutoLoader",
    "ModelSpec",
    "download_model",
    "flagopt_home",
    "get_model_spec",
    "list_models",
    "load_registry",
    "model_local_dir",
    "probe_weight_files",
    "resolve_model",
]
