"""``generate``: token ids in, token ids and scores out, for every strategy.

This is the general entry point under the Predictor's text methods. It sizes the static
cache for prompt + new tokens (capped by the position table), picks the strategy's chooser,
and runs the one decoding loop of ``engine.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

import torch
from torch import nn

from flagopt.predictor.beam import BeamChooser
from flagopt.predictor.contrastive import ContrastiveChooser
from flagopt.predictor.engine import Chooser, GenerationResult, check_cache_dtype, \
    decode_steps, start_state
from flagopt.predictor.params import GenerationParams
from flagopt.predictor.speculative import SpeculativeChooser, check_draft
from flagopt.predictor.stopping import StopStrings, max_new_tokens_allowed
from flagopt.predictor.strategies import STRATEGIES

# The one dispatch: which chooser picks each strategy's tokens (same keys as STRATEGIES).
CHOOSERS: dict[str, type[Chooser]] = {"greedy": Chooser, "sample": Chooser,
                                       "beam": BeamChooser, "contrastive": ContrastiveChooser}

def check_inputs(model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate a prompt batch; returns the attention mask (all ones when none is given)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.dtype not in (torch.long, torch.int):
        raise TypeError("input_ids must be an integer tensor of shape (batch, seq), got "
                        f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected at least one "
                         f"token per row (the tokenizer always adds </s>)")
    vocab = model.config.vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                         f"{tuple(input_ids.shape)}")
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no real token")
    return attention_mask.long()


def iter_generate(model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, params: GenerationParams, *,
                  decode: Callable[[list[int]], str] | None = None,
                  check_every: int | None = None, compile: bool = False,
                  cache_dtype: torch.dtype | str | None = None,
                  draft: nn.Module | str | None = None
                  ) -> Generator[torch.Tensor, None, GenerationResult]:
    """Yield each step's new tokens (one per cache row); return the ``GenerationResult``.

    Args:
        model: an ``OPTForCausalLM`` (any dtype/device; inputs must be on its device).
        input_ids / attention_mask: (B, T) left-padded prompts and their mask.
        params: validated generation parameters.
        decode: ids -> text, needed only for ``params.stop`` strings.
        check_every: steps between host checks for "all rows done" (default: 1 on CPU, 4
            on CUDA).
        compile: run the one-token steps through ``torch.compile`` (CUDA graphs on GPU);
            same results, less per-step overhead once compiled. The first call per batch
            shape pays the compilation. Strategies that cannot compile (contrastive
            search, see ``strategies.py``) run eagerly.
        cache_dtype: the KV cache's dtype; None (default) is the model's own, the
            reference's numerics. ``torch.float32`` for a bf16/fp16 model on CPU is often
            faster there and changes the numbers slightly.
        draft: speculative decoding (``speculative.py``) with this draft model, or
            ``"int8"`` for the target's own weights in int8: greedy gives the same tokens,
            sampling the same distribution, as without a draft. Greedy and sampling only;
            runs eagerly (``compile`` is not used). The result's ``speculative`` holds the
            acceptance figures.

    Raises:
        ValueError: a draft with a strategy that cannot use one, or a draft that does not
            fit the model (see ``speculative.check_draft``).
    """
    attention_mask = check_inputs(model, input_ids, attention_mask)
    cache_dtype = check_cache_dtype(cache_dtype)
    max_new = max_new_tokens_allowed(input_ids.shape[1], params.max_new_tokens,
                                     model.config.max_position_embeddings)
    strategy = STRATEGIES[params.strategy]
    if draft is not None:
        if not strategy.draft:
            takes = ", ".join(repr(n) for n, s in STRATEGIES.items() if s.draft)
            raise ValueError(f"strategy={params.strategy!r} cannot use a draft model; "
                             f"speculative decoding supports {takes}")
        draft = check_draft(model, draft)
        compile = False  # verification runs several positions per forward: eager steps
    if max_new == 0:
        return _nothing(input_ids.repeat_interleave(params.num_return_sequences, 0))
    stops = None
    if params.stop and strategy.stop_strings:
        if decode is None:
            raise ValueError("stop strings need a decode function (pass the tokenizer's)")
        stops = StopStrings(params.stop, decode)
    if check_every is None:
        check_every = 1 if input_ids.device.type == "cpu" else 4
    with torch.inference_mode():
        state = start_state(model, input_ids, attention_mask, max_new,
                            params.rows_per_prompt, compile=compile and strategy.compile,
                            cache_dtype=cache_dtype)
        pad = model.config.pad_token_id
        chooser = CHOOSERS[params.strategy](params, state, pad) if draft is None else \
            SpeculativeChooser(params, state, pad, draft)
    yield from _each_step_in_inference_mode(decode_steps(state, chooser, stops, check_every))
    with torch.inference_mode():
        return chooser.result(state)


def _each_step_in_inference_mode(steps: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``steps``, each advanced under ``torch.inference_mode``, which is left before every
    ``yield``: the caller's code between steps runs in the caller's own grad mode, and
    generators closed in any order cannot leave the thread in inference mode."""
    try:
        while True:
            with torch.inference_mode():
                tokens = next(steps, None)
            if tokens is None:
                return
            yield tokens
    finally:
        with torch.inference_mode():
            steps.close()


def generate(model: nn.Module, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None,
             params: GenerationParams | None = None, **kwargs) -> GenerationResult:
    """Run ``iter_generate`` to the end. ``kwargs`` go to ``iter_generate``."""
    return drain(iter_generate(model, input_ids, attention_mask, params or GenerationParams(),
                               **kwargs))


def drain(steps: Generator[torch.Tensor, None, GenerationResult]) -> GenerationResult:
    """Run an ``iter_generate`` generator to its end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _nothing(input_ids: torch.Tensor) -> GenerationResult:
    """The result when the prompt already fills the position table: no new tokens."""
    n = input_ids.shape[0]  # batch * num_return_sequences
    return GenerationResult(input_ids.clone(), input_ids.shape[1], [0] * n,
                            ["positions"] * n, torch.zeros(n), torch.zeros(n, 0))
