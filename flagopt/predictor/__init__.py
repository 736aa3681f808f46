"""Generation: composable logits processors, stopping criteria and one decoding loop."""

from flagopt.predictor.engine import GenerationResult, SpeculativeStats
from flagopt.predictor.generation import generate, iter_generate
from flagopt.predictor.params import GenerationParams
from flagopt.predictor.predictor import GeneratedText, GenerateOutput, Predictor

__all__ = ["GeneratedText", "GenerateOutput", "GenerationParams", "GenerationResult",
           "Predictor", "SpeculativeStats", "generate", "iter_generate"]
