"""Predictor: FlagAI's text-in, text-out generation methods over flagopt's engine.

Each ``predict_generate_*`` method hands its parameters, under its own names, to
``GenerationParams``, which validates them once (errors say ``out_max_length``, not
``max_new_tokens``), then runs the path of ``generate``, which tokenizes (left padding,
truncation that keeps the last tokens), runs the decoding engine and decodes the continuation
only, without special tokens. One prompt gives a string, a list gives a list. Strings
returned are ``GeneratedText``: ordinary ``str`` that also say whether the prompt was
truncated and why generation stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flagopt.predictor.engine import GenerationResult, SpeculativeStats, check_cache_dtype
from flagopt.predictor.generation import drain, iter_generate
from flagopt.predictor import scoring
from flagopt.predictor.params import GenerationParams, check
from flagopt.predictor.scoring import LogLikelihood, PerplexityResult, TextScore
from flagopt.predictor.speculative import check_draft
from flagopt.predictor.stopping import cut_at_stop
from flagopt.predictor.strategies import STRATEGIES
from flagopt.tokenizer import OPTTokenizer

ProgressFn = Callable[[int, int], None]

logger = logging.getLogger(__name__)

# Keyword arguments every predict method accepts beyond its own, and their GenerationParams
# names.
_EXTRA = {"seed": "seed", "stop": "stop", "eos_token_id": "eos_token_ids",
          "num_return_sequences": "num_return_sequences",
          "no_repeat_ngram_size": "no_repeat_ngram_size", "min_new_tokens": "min_new_tokens",
          "min_p": "min_p", "length_penalty": "length_penalty",
          "early_stopping": "early_stopping", "repetition_penalty": "repetition_penalty",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
# FlagAI's names of GenerationParams fields, for error messages.
_FLAGAI_NAMES = {"max_new_tokens": "out_max_length", "num_beams": "beam_size",
                 "eos_token_ids": "eos_token_id"}


class GeneratedText(str):
    """A generated continuation (a ``str``) that also carries how it came about.

    Attributes:
        truncated: the prompt was longer than ``input_max_length`` (or than the position
            table less one new token) and lost its oldest tokens.
        finish_reason: ``"eos"``, ``"stop"`` (a stop string), ``"length"`` (out_max_length)
            or ``"positions"`` (the model's 2048-position table is full).
        num_tokens: tokens generated (a final EOS included).
    """

    truncated: bool
    finish_reason: str
    num_tokens: int

    def __new__(cls, text: str, truncated: bool, finish_reason: str, num_tokens: int
                ) -> "GeneratedText":
        obj = super().__new__(cls, text)
        obj.truncated, obj.finish_reason, obj.num_tokens = truncated, finish_reason, num_tokens
        return obj

    def __reduce__(self) -> tuple:
        # pickle / copy / deepcopy: rebuild through __new__, then restore any other attributes
        args = (str(self), self.truncated, self.finish_reason, self.num_tokens)
        return type(self), args, dict(self.__dict__)


@dataclass
class GenerateOutput:
    """What ``Predictor.generate`` returns: texts plus the engine's ids and scores."""

    texts: list[GeneratedText]  # batch * num_return_sequences, prompt-major
    result: GenerationResult
    truncated: list[bool]


class Predictor:
    """Generation with an OPT causal LM and its tokenizer (FlagAI-compatible methods)."""

    def __init__(self, model: nn.Module, tokenizer: OPTTokenizer, *,
                 compile: bool = False, cache_dtype: torch.dtype | str | None = None,
                 draft: nn.Module | str | None = None) -> None:
        """Args:
            model: an ``OPTForCausalLM``.
            tokenizer: its ``OPTTokenizer``.
            compile: run decoding steps through ``torch.compile`` (CUDA graphs on GPU):
                same results, less per-token overhead after a one-time compilation per
                batch shape.
            cache_dtype: the KV cache's dtype (float32, float16, bfloat16); None is the
                model's own. float32 for a half-precision model on CPU is often faster
                and changes the numbers slightly.
            draft: speculative decoding for greedy and sampling: a smaller OPT over the
                same tokenizer (an ``OPTForCausalLM`` on the same device), or ``"int8"`` for
                the target's own weights quantized to int8 (built here, no download).
                Greedy output is token-for-token the output without a draft, sampling has
                the target's distribution; beam and contrastive search refuse a draft.
                ``last_speculative_stats`` holds the latest call's acceptance figures.
        """
        if not hasattr(model, "lm_head"):
            raise TypeError(f"Predictor needs a causal LM (OPTForCausalLM), got "
                            f"{type(model).__name__}; load it with task_name='lm'")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if _device(model).type == "meta":
            raise ValueError("the model is on the meta device, which holds no weights; load "
                             "it on cpu or cuda")
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        self.cache_dtype = check_cache_dtype(cache_dtype)
        self.draft = None if draft is None else check_draft(model, draft)
        self.last_speculative_stats: SpeculativeStats | None = None

    # --- FlagAI's methods ------------------------------------------------------------------

    def predict_generate_randomsample(self, text: str | Sequence[str],
                                      input_max_length: int = 256, out_max_length: int = 200,
                                      top_k: int = 30, top_p: float = 1.0,
                                      repetition_penalty: float = 1.0,
                                      temperature: float = 1.0, **kwargs
                                      ) -> str | list:
        """Sample a continuation (temperature, top-k, top-p, min-p, penalties).

        ``top_k=0`` turns top-k off; ``temperature=0`` means greedy. Extra keyword arguments:
        seed, stop, eos_token_id, num_return_sequences, no_repeat_ngram_size,
        min_new_tokens, min_p, presence_penalty, frequency_penalty.
        """
        return self._texts(text, input_max_length, kwargs, strategy="sample",
                           max_new_tokens=out_max_length,
                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                           temperature=temperature)

    def predict_generate_beamsearch(self, text: str | Sequence[str],
                                    input_max_length: int = 256, out_max_length: int = 100,
                                    beam_size: int = 1, **kwargs) -> str | list:
        """Beam search (sum of log-probabilities; ``length_penalty``, ``early_stopping``,
        ``num_return_sequences`` up to ``beam_size``)."""
        return self._texts(text, input_max_length, kwargs, strategy="beam",
                           max_new_tokens=out_max_length,
                           num_beams=beam_size)

    def predict_generate_greedy(self, text: str | Sequence[str], input_max_length: int = 256,
                                out_max_length: int = 200, **kwargs) -> str | list:
        """The most likely token at every step (with optional penalties)."""
        return self._texts(text, input_max_length, kwargs, strategy="greedy",
                           max_new_tokens=out_max_length)

    def predict_generate_contrastive_search(self, text: str | Sequence[str],
                                            input_max_length: int = 256,
                                            out_max_length: int = 200,
                                            beam_size: int | None = None,
                                            penalty_alpha: float = 0.6, *,
                                            top_k: int | None = None, **kwargs
                                            ) -> str | list:
        """Contrastive search: the likeliest of ``top_k`` candidates, penalised by its
        similarity to the context (``penalty_alpha``).

        ``beam_size`` is FlagAI's name for the candidate count (4th positional argument, as
        in FlagAI's signature) and means ``top_k``; give either (default 4).

        Raises:
            ValueError: ``beam_size`` and ``top_k`` are both given and differ.
        """
        top_k = _candidate_count(beam_size, top_k)
        return self._texts(text, input_max_length, kwargs, strategy="contrastive",
                           max_new_tokens=out_max_length,
                           top_k=top_k, penalty_alpha=penalty_alpha)

    # --- general forms -----------------------------------------------------------------------

    def generate(self, text: str | Sequence[str], input_max_length: int = 256,
                 **params) -> GenerateOutput:
        """Generate for one prompt or a batch and return texts, token ids and scores.

        ``params`` are ``GenerationParams`` fields (``strategy``, ``max_new_tokens``,
        ``top_k`` ...) plus the predict methods' extra names (``eos_token_id``).
        """
        return self._generate(_as_texts(text), input_max_length, _params(params))

    def stream(self, text: str, input_max_length: int = 256, **params) -> Iterator[str]:
        """Yield the continuation of one prompt as it is produced.

        Never yields half of a multi-byte character; the pieces join to exactly the text the
        non-streaming call returns (stop strings are held back until they can be ruled out).
        Beam search cannot stream: it yields its final text at once.
        """
        if not isinstance(text, str):
            raise TypeError(f"stream takes one prompt (str), got {type(text).__name__}")
        gen = _params(params)
        if gen.num_return_sequences != 1:
            raise ValueError("stream returns one sequence; use num_return_sequences=1")
        if not STRATEGIES[gen.strategy].streaming:
            whole = str(self._generate([text], input_max_length, gen).texts[0])
            if whole:  # like the other strategies, never an empty piece
                yield whole
            return
        enc = self._encode([text], input_max_length)
        steps = iter_generate(self.model, enc.input_ids, enc.attention_mask, gen,
                              decode=self.tokenizer.decode, compile=self.compile,
                              cache_dtype=self.cache_dtype, draft=self._draft_for(gen))
        yield from StopAwareStream(self.tokenizer, gen.stop).run(steps)

    # --- scoring (flagopt/predictor/scoring.py) -----------------------------------------------

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], batch_size: int = 8, *,
                      progress: ProgressFn | None = None) -> list[LogLikelihood]:
        """Per ``(context, continuation)`` pair, lm-eval's ``(logprob, is_greedy)``: the sum
        of the continuation tokens' log-probabilities given the context, and whether greedy
        decoding would have produced exactly those tokens. Tokenized as lm-eval's ``hf``
        model does (see ``flagopt.predictor.scoring``); a pair longer than the model's window
        keeps its last ``window + 1`` tokens.

        Args:
            pairs: ``(context, continuation)`` string pairs; the context may be empty.
            batch_size: windows per forward pass (grouped by length).
            progress: called after each forward with (windows done, total windows).

        Raises:
            ScoringError: a continuation is empty or longer than the window.
            TypeError, ValueError: ``pairs`` or ``batch_size`` is malformed.
        """
        return scoring.loglikelihood(self.model, self.tokenizer, _as_pairs(pairs),
                                     _batch_size(batch_size), progress)

    def score(self, text: str | Sequence[str], batch_size: int = 8, *,
              progress: ProgressFn | None = None) -> TextScore | list[TextScore]:
        """Log-probability of every token of each text, given ``</s>`` and the tokens before
        it, and their sum; a text longer than the window is scored over disjoint windows.
        One text gives a ``TextScore``, a list gives a list.

        Raises:
            ScoringError: a text is empty.
        """
        out = scoring.score_texts(self.model, self.tokenizer, _as_texts(text),
                                  _batch_size(batch_size), progress)
        return out[0] if isinstance(text, str) else out

    def perplexity(self, text: str, stride: int = 512, max_length: int | None = None,
                   batch_size: int = 8, *, progress: ProgressFn | None = None
                   ) -> PerplexityResult:
        """Sliding-window perplexity, exactly as transformers' perplexity guide computes it:
        windows of ``max_length`` tokens moving by ``stride``, each scoring only the tokens
        the previous one did not, window losses weighted as the guide does. The text gets one
        ``</s>`` in front (as ``tokenizer(text)`` in the guide); it is context, never scored.

        Args:
            text: the whole text (e.g. a test set joined with ``"\\n\\n"``).
            stride: tokens each window moves, 1..max_length.
            max_length: window length, 2..max_position_embeddings (None: the latter).
            batch_size: windows per forward pass.

        Raises:
            ScoringError: the text is empty.
            TypeError, ValueError: a bad ``stride``/``max_length``/``batch_size``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        window = scoring.window_of(self.model)
        max_length = window if max_length is None else _int_in("max_length", max_length, 2,
                                                                window)
        stride = _int_in("stride", stride, 1, max_length)
        return scoring.perplexity(self.model, self.tokenizer, text, stride, max_length,
                                  _batch_size(batch_size), progress)

    # --- helpers -----------------------------------------------------------------------------

    def _texts(self, text: str | Sequence[str], input_max_length: int, kwargs: dict,
               **params) -> str | list:
        unknown = sorted(set(kwargs) - set(_EXTRA))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; accepted "
                            f"extras: {', '.join(sorted(_EXTRA))}")
        params.update({_EXTRA[k]: v for k, v in kwargs.items()})
        out = self._generate(_as_texts(text), input_max_length,
                             _params(params, _FLAGAI_NAMES))
        n = len(out.texts) // len(out.truncated)  # num_return_sequences
        rows = [out.texts[i:i + n] for i in range(0, len(out.texts), n)]
        per_prompt = [r[0] if n == 1 else r for r in rows]
        return per_prompt[0] if isinstance(text, str) else per_prompt

    def _generate(self, texts: list[str], input_max_length: int, gen: GenerationParams
                  ) -> GenerateOutput:
        enc = self._encode(texts, input_max_length)
        steps = iter_generate(self.model, enc.input_ids, enc.attention_mask, gen,
                              decode=self.tokenizer.decode, compile=self.compile,
                              cache_dtype=self.cache_dtype, draft=self._draft_for(gen))
        result = drain(steps)
        self.last_speculative_stats = result.speculative
        return GenerateOutput(self._decode(result, enc.truncated, gen), result, enc.truncated)

    def _draft_for(self, gen: GenerationParams) -> nn.Module | None:
        """The draft for ``gen``'s strategy; a strategy that cannot use one raises."""
        if self.draft is not None and not STRATEGIES[gen.strategy].draft:
            takes = ", ".join(repr(n) for n, s in STRATEGIES.items() if s.draft)
            raise ValueError(f"strategy={gen.strategy!r} cannot use this Predictor's draft "
                             f"model; speculative decoding supports {takes} (make a "
                             f"Predictor without draft= for it)")
        return self.draft

    def _encode(self, texts: list[str], input_max_length: int):
        """Tokenize, keeping each prompt's last tokens: at most ``input_max_length`` of them,
        and at most ``max_position_embeddings - 1`` so that one new token always fits."""
        input_max_length = check("input_max_length", input_max_length)
        room = self.model.config.max_position_embeddings - 1
        enc = self.tokenizer(texts, padding_side="left",
                             max_length=min(input_max_length, room))
        if any(enc.truncated):
            if input_max_length <= room:
                logger.warning("prompt longer than input_max_length=%d tokens: kept its "
                               "last tokens", input_max_length)
            else:
                logger.warning("prompt longer than the model's position table allows "
                               "(max_position_embeddings=%d, one position left for a new "
                               "token): kept its last %d tokens", room + 1, room)
        return enc.to(_device(self.model))

    def _decode(self, result: GenerationResult, truncated: list[bool],
                gen: GenerationParams) -> list[GeneratedText]:
        n = len(result.num_generated) // len(truncated)
        texts = self.tokenizer.batch_decode(result.new_tokens)
        out = []
        for i, text in enumerate(texts):
            reason = result.finish_reasons[i]
            if gen.stop:
                cut = cut_at_stop(text, gen.stop)
                reason = "stop" if len(cut) < len(text) or reason == "stop" else reason
                text = cut
            out.append(GeneratedText(text, truncated[i // n], reason,
                                     result.num_generated[i]))
        return out


class StopAwareStream:
    """Streams one sequence's text, holding back a tail that could still become a stop string.

    Feed it token ids with ``push`` (text ready now, and whether a stop string ended it) and
    end it with ``finish``; the pieces join to the text cut at the first stop string and never
    split a character. ``Predictor.stream`` and the server's rows use it alike.
    """

    def __init__(self, tokenizer: OPTTokenizer, stops: tuple[str, ...]) -> None:
        self.decoder = tokenizer.incremental_decoder()
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; the text that can be released now, and whether it hit a stop."""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """End the stream (no stop was hit): the text still held back."""
        self.pending += self.decoder.flush()
        return self._release(final=True)[0]

    def run(self, steps: Iterator[torch.Tensor]) -> Iterator[str]:
        while True:
            try:
                tokens = next(steps)
            except StopIteration:
                break
            piece, stopped = self.push(int(tokens[0]))
            if piece:
                yield piece
            if stopped:
                steps.close()
                return
        piece = self.finish()
        if piece:
            yield piece

    def _release(self, final: bool) -> tuple[str, bool]:
        if self.stops:
            cut = cut_at_stop(self.pending, self.stops)
            if len(cut) < len(self.pending):
                self.pending = ""
                return cut, True
        keep = 0 if final or not self.stops else self.hold
        piece = self.pending[:len(self.pending) - keep] if keep else self.pending
        self.pending = self.pending[len(piece):]
        return piece, False


def _candidate_count(beam_size: object, top_k: object) -> object:
    """Contrastive search's candidate count from FlagAI's ``beam_size`` or ``top_k``."""
    if beam_size is not None and top_k is not None and beam_size != top_k:
        raise ValueError(f"beam_size={beam_size!r} and top_k={top_k!r} disagree; they name the "
                         f"same thing (contrastive search's candidate count): pass one of them")
    if beam_size is not None:
        count = check("top_k", beam_size, as_name="beam_size")
        if count < 1:
            raise ValueError(f"beam_size={count!r} is out of range; expected >= 1 (contrastive "
                             f"search's candidate count)")
        return count
    return 4 if top_k is None else top_k


def _as_texts(text: str | Sequence[str]) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, Sequence) and text and all(isinstance(t, str) for t in text):
        return list(text)
    raise TypeError("text must be a string or a non-empty list of strings, got "
                    f"{type(text).__name__} {text!r:.80}")


def _as_pairs(pairs: object) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise TypeError(f"pairs must be a non-empty list of (context, continuation) string "
                        f"pairs, got {type(pairs).__name__} {pairs!r:.80}")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2
                and all(isinstance(p, str) for p in pair)):
            raise TypeError(f"pairs[{i}] must be a (context, continuation) pair of strings, "
                            f"got {pair!r:.80}")
    return [(c, x) for c, x in pairs]


def _int_in(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range; expected {low}..{high}")
    return value


def _batch_size(value: object) -> int:
    return _int_in("batch_size", value, 1, 1 << 20)


def _params(params: dict, names: dict[str, str] | None = None) -> GenerationParams:
    """``GenerationParams`` from keyword arguments that may say ``eos_token_id``; errors name
    fields as ``names`` (the caller's names) say."""
    params, names = dict(params), dict(names or {})
    if "eos_token_id" in params:
        params["eos_token_ids"] = params.pop("eos_token_id")
        names["eos_token_ids"] = "eos_token_id"
    return GenerationParams(**params, caller_names=names)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
