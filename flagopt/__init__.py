"""flagopt: Meta's OPT language models one call away.

    from flagopt import AutoLoader, Predictor
    loader = AutoLoader(task_name="lm", model_name="opt-125m-en")
    predictor = Predictor(loader.get_model(), loader.get_tokenizer())
    predictor.predict_generate_randomsample("The trophy doesn't fit in the suitcase because")
"""

from flagopt.auto_model import AutoLoader
from flagopt.model.config import OPTConfig
from flagopt.model.heads import (OPTForCausalLM, OPTForQuestionAnswering,
                                 OPTForSequenceClassification)
from flagopt.model.decoder import OPTModel
from flagopt.model.loading import load_pretrained
from flagopt.predictor import GenerationParams, Predictor
from flagopt.tokenizer import OPTTokenizer
from flagopt.train.trainer import Trainer
from flagopt.version import __version__

__all__ = ["AutoLoader", "GenerationParams", "OPTConfig", "OPTForCausalLM",
           "OPTForQuestionAnswering", "OPTForSequenceClassification", "OPTModel",
           "OPTTokenizer", "Predictor", "Trainer", "__version__", "load_pretrained"]
