"""flagopt as an lm-evaluation-harness model, registered under the name ``flagopt``.

    import lm_eval
    from lm_eval.tasks import TaskManager
    from flagopt.eval.harness import FlagOptLM

    lm = FlagOptLM.from_pretrained("opt-125m-en", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"],
                            task_manager=TaskManager(include_path="my_tasks"))

Requests are answered as lm-eval's own ``hf`` model answers them for a causal LM (same
tokenization, windows and stop rules), on flagopt's scoring core
(``flagopt.predictor.scoring``) and decoding engine. Importing this module needs the ``eval``
extra (``pip install 'flagopt[eval]'``).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from flagopt.errors import MissingDependencyError, ScoringError, UnknownEvalTaskError
from flagopt.predictor import GenerationParams, Predictor
from flagopt.predictor import scoring
from flagopt.predictor.generation import generate

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model, register_model
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(f"flagopt's lm-eval model needs lm-evaluation-harness "
                                 f"({exc}): pip install 'flagopt[eval]'") from exc

logger = logging.getLogger(__name__)

MODEL_NAME = "flagopt"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf model's default


class FlagOptLM(LM):
    """lm-eval's ``LM`` interface over a ``Predictor``.

    Args:
        predictor: the model and tokenizer to evaluate.
        batch_size: windows (or prompts) per forward pass.
        max_gen_toks: default generation budget of ``generate_until``.
    """

    def __init__(self, predictor: Predictor, batch_size: int = 8,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> None:
        super().__init__()
        if not isinstance(predictor, Predictor):
            raise TypeError(f"predictor must be a flagopt Predictor, got "
                            f"{type(predictor).__name__}")
        self.predictor = predictor
        self.batch_size = _positive("batch_size", batch_size)
        self.max_gen_toks = _positive("max_gen_toks", max_gen_toks)

    @classmethod
    def from_pretrained(cls, model: str, batch_size: int = 8, **loader_options: Any
                        ) -> "FlagOptLM":
        """Load ``model`` (registry name, hub repo id or local directory) with ``AutoLoader``
        options (``device``, ``dtype``, ``model_dir`` ...)."""
        from flagopt.auto_model import AutoLoader

        loader = AutoLoader("lm", model, **loader_options)
        return cls(Predictor(loader.get_model(), loader.get_tokenizer()), batch_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                               ) -> "FlagOptLM":
        """``lm_eval --model flagopt --model_args pretrained=opt-125m-en,dtype=float32``."""
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "pretrained" not in args:
            raise ValueError(f"model_args must name pretrained=<model>, got {arg_string!r}")
        batch_size = int(extra.pop("batch_size", args.pop("batch_size", 8)))
        options = {k: v for k, v in args.items() if k != "pretrained"}
        if "device" in extra:
            options.setdefault("device", extra["device"])
        return cls.from_pretrained(args["pretrained"], batch_size=batch_size, **options)

    @property
    def window(self) -> int:
        """The model's ``max_position_embeddings`` (lm-eval's ``max_length``)."""
        return scoring.window_of(self.predictor.model)

    # --- the three request types -------------------------------------------------------------

    def loglikelihood(self, requests: Sequence, disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """``(logprob, is_greedy)`` per ``(context, continuation)`` request."""
        pairs = [tuple(r.args) for r in requests]
        try:
            out = self.predictor.loglikelihood(pairs, self.batch_size)
        except ScoringError as exc:
            raise ScoringError(f"{exc} (task {_task_of(requests, exc)})") from None
        return [(lp, greedy) for lp, greedy in out]

    def loglikelihood_rolling(self, requests: Sequence, disable_tqdm: bool = False
                              ) -> list[float]:
        """Sum of log-probabilities of each whole text, over lm-eval's disjoint rolling
        windows: the text encoded with its ``</s>`` (as the hf model's ``tok_encode``), and
        ``</s>`` again as the prefix token, so the text's own ``</s>`` is scored too."""
        tok = self.predictor.tokenizer
        ids = [scoring.encode_with_bos(tok, r.args[0]) for r in requests]
        scores = scoring.rolling_loglikelihood(self.predictor.model, ids, tok.bos_token_id,
                                               self.batch_size)
        return [s.logprob for s in scores]

    def generate_until(self, requests: Sequence, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations: the context cut to its last ``max_length - max_gen_toks``
        tokens, generation ended by ``</s>``, an ``until`` string or ``max_gen_toks``, and the
        text cut before the first stop string (lm-eval's hf model)."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until, max_gen, params = self._generation_params(kwargs)
            order = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in batch], max_gen, params)
                for i, text in zip(batch, texts):
                    for term in until:
                        if term:
                            text = text.split(term)[0]
                    out[i] = text
        return out  # type: ignore[return-value]

    def _generation_params(self, kwargs: dict) -> tuple[list[str], int, GenerationParams]:
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos = self.predictor.tokenizer.decode([2], skip_special_tokens=False)
        if eos not in until:
            until.append(eos)
        max_gen = kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks))
        do_sample = kwargs.pop("do_sample", False)
        temperature = kwargs.pop("temperature", 0.0)
        if do_sample or temperature:
            raise ValueError(f"generate_until: flagopt's lm-eval model decodes greedily; got "
                             f"do_sample={do_sample!r}, temperature={temperature!r}")
        if kwargs:
            logger.warning("generate_until ignores generation arguments %s", sorted(kwargs))
        if max_gen >= self.window:
            raise ValueError(f"max_gen_toks={max_gen} must be less than the model's window "
                             f"of {self.window} tokens")
        stops = tuple(s for s in until if s and s != eos)
        return until, max_gen, GenerationParams(max_new_tokens=max_gen, strategy="greedy",
                                                stop=stops)

    def _generate(self, contexts: list[str], max_gen: int, params: GenerationParams
                  ) -> list[str]:
        tok = self.predictor.tokenizer
        keep = self.window - max_gen
        rows = [scoring.encode_with_bos(tok, c)[-keep:] for c in contexts]  # hf: left cut
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):  # left padding
            ids[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = 1
        device = next(self.predictor.model.parameters()).device
        result = generate(self.predictor.model, ids.to(device), mask.to(device), params,
                          decode=tok.decode)
        return tok.batch_decode(result.new_tokens)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _task_of(requests: Sequence, exc: Exception) -> str:
    """The task of the request an error names (``pairs[i]``), for the message."""
    import re

    found = re.search(r"pairs\[(\d+)\]", str(exc))
    if not found:
        return "unknown"
    r = requests[int(found.group(1))]
    return f"{getattr(r, 'task_name', None)!r}, doc {getattr(r, 'doc_id', None)!r}"


def register() -> None:
    """Register ``FlagOptLM`` as lm-eval's ``flagopt`` model (idempotent; other models
    are untouched)."""
    try:
        if get_model(MODEL_NAME) is FlagOptLM:
            return
    except (KeyError, ValueError, ImportError):
        pass
    register_model(MODEL_NAME)(FlagOptLM)


register()


def check_tasks(tasks: Sequence[str], task_manager: Any) -> list[str]:
    """The task names, or ``UnknownEvalTaskError`` naming the first one lm-eval does not
    know, with the nearest known names."""
    known = set(task_manager.all_tasks)
    for name in tasks:
        if name not in known and not task_manager.match_tasks([name]):
            near = difflib.get_close_matches(name, sorted(known), n=5)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UnknownEvalTaskError(f"unknown lm-eval task {name!r}{hint} (add your own "
                                       f"YAML tasks with --include-path DIR)")
    return list(tasks)


def evaluate(lm: FlagOptLM, tasks: Sequence[str], task_manager: Any = None,
             num_fewshot: int | None = None, limit: int | float | None = None) -> dict:
    """``lm_eval.simple_evaluate`` on ``lm`` over ``tasks`` (names checked first) with
    ``task_manager`` (default: lm-eval's tasks only)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = task_manager if task_manager is not None else TaskManager()
    check_tasks(tasks, manager)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                   limit=limit, task_manager=manager)
