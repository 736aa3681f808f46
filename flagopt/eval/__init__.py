"""Evaluation: ``flagopt perplexity`` and ``flagopt eval`` (lm-evaluation-harness).

The scoring itself is ``Predictor.loglikelihood`` / ``score`` / ``perplexity``
(``flagopt/predictor/scoring.py``); this package holds the commands and the lm-eval model
(``flagopt.eval.harness``, which needs the ``eval`` extra). Importing the package imports
neither lm-eval nor torch.
"""
