"""The three engines behind one small interface, so the worker times them identically.

Each adapter takes prompts as lists of token ids (every engine gets the same ones) and offers:

- ``unavailable()``: why this configuration cannot run on this install, or ``None``;
- ``load()``: checkpoint directory -> ready model (timed by the worker);
- ``weights_bytes()`` and ``position_bytes()``: the weights in the target dtype, and the part
  of it that is the learned position table (read one row per token, so not per-token traffic);
- ``stream(prompt, n)``: batch-1 greedy generation of exactly ``n`` tokens, returning the
  time to the first token and the time of the remaining ``n - 1``;
- ``generate(prompts, n)``: one batched greedy call of exactly ``n`` new tokens per row;
- ``prefill(prompt)``: one forward pass over the prompt that yields next-token logits;
- ``last_tokens``: the ids ``stream`` generated (the report's "same tokens" column compares
  them with transformers' float32 greedy tokens), and ``acceptance`` (speculative runs: the
  share of draft tokens the target agreed with, else None).

Speculative decoding (``spec["draft"]``): flagopt with ``draft=`` (``{"kind": "int8"}``, the
target's own int8 weights, or ``{"kind": "model", "checkpoint": ...}``), transformers with
``assistant_model=`` (assisted generation, batch 1 only; a model draft).

End-of-sequence never stops a run early: flagopt gets no EOS ids, transformers
``min_new_tokens = max_new_tokens``, CTranslate2 ``min_length = max_length``; and every call
checks that exactly ``n`` tokens per row came back.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path

TORCH_DTYPES = ("float32", "float16", "bfloat16")


class EngineError(RuntimeError):
    """An engine returned something other than what was asked (e.g. too few tokens)."""


class Unavailable(Exception):
    """This configuration cannot run on this install (reported, not a failure)."""


def _check_count(engine: str, got: list[int], n: int) -> None:
    if any(g != n for g in got):
        raise EngineError(f"{engine} generated {got} tokens per row, expected {n} each "
                          f"(end-of-sequence must not stop a benchmark run)")


class _TorchEngine:
    """What flagopt and transformers share: torch tensors, devices, weight accounting."""

    name = "torch"

    def __init__(self, spec: dict) -> None:
        import torch

        self.torch = torch
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.dtype = getattr(torch, spec["compute_dtype"])
        self.model = None
        self.draft = None
        self.last_tokens: list[int] = []
        self.acceptance: float | None = None

    def ids(self, prompts: list[list[int]]):
        return self.torch.tensor(prompts, dtype=self.torch.long, device=self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def weights_bytes(self) -> int:
        seen: dict[int, int] = {}
        for t in [*self.model.parameters(), *self.model.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def position_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                   if "embed_positions" in n)


class FlagoptEngine(_TorchEngine):
    name = "flagopt"

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        try:  # the prepared-weights cache: bench.py prepares it first, so loads are warm
            from flagopt.model.prepared import load_prepared as load_pretrained
        except ImportError:  # an older checkout
            from flagopt.model.loading import load_pretrained
        from flagopt.predictor.generation import generate, iter_generate
        from flagopt.predictor.params import GenerationParams

        self._load, self._generate, self._iter = load_pretrained, generate, iter_generate
        self._params = GenerationParams
        self.load_kwargs, self.gen_kwargs, self.unknown = self._split_options(
            spec.get("options", {}))
        if self._cpu_half() and "cache_dtype" in inspect.signature(self._iter).parameters:
            # The figures in RESULTS.md were measured with a float32 KV cache for half
            # precision on CPU (faster attention kernels there); keep them comparable.
            self.gen_kwargs.setdefault("cache_dtype", self.torch.float32)

    def _cpu_half(self) -> bool:
        return self.device.type == "cpu" and self.dtype in (self.torch.float16,
                                                            self.torch.bfloat16)

    def _split_options(self, options: dict) -> tuple[dict, dict, list[str]]:
        """``--flagopt-options`` go to whichever of load_pretrained / iter_generate takes them."""
        load_params = inspect.signature(self._load).parameters
        gen_params = inspect.signature(self._iter).parameters
        load = {k: v for k, v in options.items() if k in load_params}
        gen = {k: v for k, v in options.items() if k in gen_params}
        unknown = [k for k in options if k not in load and k not in gen]
        return load, gen, unknown

    def unavailable(self) -> str | None:
        if self.unknown:
            return (f"--flagopt-options {self.unknown} accepted by neither load_pretrained "
                    f"nor iter_generate")
        if self.spec.get("quantize") and \
                "quantize" not in inspect.signature(self._load).parameters:
            return "load_pretrained has no quantize= parameter in this checkout"
        return None

    def load(self) -> None:
        kwargs = dict(dtype=self.dtype, device=self.device, **self.load_kwargs)
        if self.spec.get("quantize"):
            kwargs["quantize"] = self.spec["quantize"]
        try:
            self.model = self._load(self.spec["checkpoint"], **kwargs)
        except TypeError as exc:  # e.g. a keyword this checkout's load_pretrained lacks
            if any(f"'{k}'" in str(exc) for k in kwargs):
                raise Unavailable(f"load_pretrained rejected its arguments: {exc}") from exc
            raise
        draft = self.spec.get("draft")
        if draft is None:
            return
        if "draft" not in inspect.signature(self._iter).parameters:
            raise Unavailable("iter_generate has no draft= parameter in this checkout")
        if draft["kind"] == "int8":  # built from the loaded weights: part of the load
            from flagopt.predictor.speculative import int8_draft
            self.draft = int8_draft(self.model, getattr(self.torch, draft["compute_dtype"]))
        else:
            self.draft = self._load(draft["checkpoint"], dtype=self.dtype, device=self.device)
        self.gen_kwargs["draft"] = self.draft

    def _gen(self, n: int):
        return self._params(max_new_tokens=n, strategy="greedy", eos_token_ids=())

    def stream(self, prompt: list[int], n: int) -> tuple[float, float]:
        ids = self.ids([prompt])
        self.sync()
        start = time.perf_counter()
        count, first = 0, 0.0
        steps = self._iter(self.model, ids, None, self._gen(n), **self.gen_kwargs)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result = done.value
                break
            count += 1
            if count == 1:
                self.sync()
                first = time.perf_counter()
        self.sync()
        end = time.perf_counter()
        _check_count(self.name, [count], n)
        self.last_tokens = result.new_tokens[0]
        stats = getattr(result, "speculative", None)
        self.acceptance = None if stats is None else stats.rate
        return first - start, end - first

    def generate(self, prompts: list[list[int]], n: int) -> None:
        ids = self.ids(prompts)
        result = self._generate(self.model, ids, None, self._gen(n), **self.gen_kwargs)
        self.sync()
        _check_count(self.name, list(result.num_generated), n)

    def prefill(self, prompt: list[int]) -> None:
        ids = self.ids([prompt])
        with self.torch.inference_mode():
            self.model(ids, logits_to_keep=1)
        self.sync()


class TransformersEngine(_TorchEngine):
    name = "transformers"

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        try:  # imported here so that load_s times the load, not the import
            from transformers import OPTForCausalLM
            self._cls, self._error = OPTForCausalLM, None
        except ImportError as exc:
            self._cls, self._error = None, exc

    def unavailable(self) -> str | None:
        if self._error is not None:
            return f"transformers is not importable ({self._error})"
        if (self.spec.get("draft") or {}).get("kind") == "int8":
            return "transformers' assisted generation takes a model, not flagopt's int8 draft"
        return None

    def load(self) -> None:
        self.model = self._from_pretrained(self.spec["checkpoint"])
        draft = self.spec.get("draft")
        if draft is not None:
            self.draft = self._from_pretrained(draft["checkpoint"])

    def _from_pretrained(self, checkpoint: str):
        model = self._cls.from_pretrained(checkpoint, dtype=self.dtype,
                                          attn_implementation="sdpa")
        return model.to(self.device).eval()

    def _kwargs(self, ids, n: int) -> dict:
        kwargs = dict(input_ids=ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                      max_new_tokens=n, min_new_tokens=n, pad_token_id=1)
        if self.draft is not None:
            kwargs["assistant_model"] = self.draft
        return kwargs

    def stream(self, prompt: list[int], n: int) -> tuple[float, float]:
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            """generate() puts the prompt first, then the new tokens (already on the host):
            one per put, or several at once in assisted generation."""

            def __init__(self) -> None:
                self.times: list[float] = []
                self.puts = 0
                self.tokens = 0

            def put(self, value) -> None:
                self.puts += 1
                if self.puts > 1:
                    self.times.append(time.perf_counter())
                    self.tokens += value.numel()

            def end(self) -> None:
                pass

        ids = self.ids([prompt])
        clock = Clock()
        self.sync()
        start = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(**self._kwargs(ids, n), streamer=clock)
        self.sync()
        end = time.perf_counter()
        _check_count(self.name, [out.shape[1] - ids.shape[1]], n)
        _check_count(self.name, [clock.tokens], n)
        self.last_tokens = out[0, ids.shape[1]:].tolist()
        return clock.times[0] - start, end - clock.times[0]

    def generate(self, prompts: list[list[int]], n: int) -> None:
        ids = self.ids(prompts)
        with self.torch.inference_mode():
            out = self.model.generate(**self._kwargs(ids, n))
        self.sync()
        _check_count(self.name, [out.shape[1] - ids.shape[1]] * ids.shape[0], n)

    def prefill(self, prompt: list[int]) -> None:
        ids = self.ids([prompt])
        with self.torch.inference_mode():
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        self.sync()


class CTranslate2Engine:
    """CTranslate2's Generator on a converted model; token strings from its own vocabulary
    (the converter builds it from the checkpoint's vocab.json, padded to the model's 50272)."""

    name = "ctranslate2"

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.generator = None
        self.vocab: list[str] = []
        self.last_tokens: list[int] = []
        self.acceptance: float | None = None

    def unavailable(self) -> str | None:
        try:
            import ctranslate2
        except ImportError as exc:
            return f"ctranslate2 is not importable ({exc})"
        if self.spec.get("unavailable"):
            return self.spec["unavailable"]
        device, _ = ct2_device(self.spec["device"])
        supported = ctranslate2.get_supported_compute_types(device)
        if self.spec["ct2_compute_type"] not in supported:
            return (f"compute_type {self.spec['ct2_compute_type']!r} is not supported on this "
                    f"{device} (supported: {sorted(supported)})")
        return None

    def load(self) -> None:
        import ctranslate2

        path = self.spec["ct2_model"]
        device, index = ct2_device(self.spec["device"])
        self.generator = ctranslate2.Generator(path, device=device, device_index=index,
                                               compute_type=self.spec["ct2_compute_type"],
                                               intra_threads=self.spec["threads"])
        self.vocab = _ct2_vocabulary(Path(path))

    def tokens(self, prompt: list[int]) -> list[str]:
        return [self.vocab[i] for i in prompt]

    def weights_bytes(self) -> int:
        return os.path.getsize(Path(self.spec["ct2_model"]) / "model.bin")

    def position_bytes(self) -> int:  # proportional share: the file mixes dtypes
        return int(self.weights_bytes() * self.spec["position_fraction"])

    def _options(self, n: int) -> dict:
        return dict(max_length=n, min_length=n, sampling_topk=1)

    def stream(self, prompt: list[int], n: int) -> tuple[float, float]:
        # The callback runs on the decoding thread as each token is chosen; generate_tokens'
        # iterator would read a queue from another thread, and its first read can come late.
        times: list[float] = []
        start = time.perf_counter()
        results = self.generator.generate_batch(
            [self.tokens(prompt)], include_prompt_in_result=False,
            callback=lambda step: times.append(time.perf_counter()) and False,
            **self._options(n))
        end = time.perf_counter()
        _check_count(self.name, [len(results[0].sequences_ids[0]), len(times)], n)
        self.last_tokens = list(results[0].sequences_ids[0])
        return times[0] - start, end - times[0]

    def generate(self, prompts: list[list[int]], n: int) -> None:
        results = self.generator.generate_batch(
            [self.tokens(p) for p in prompts], include_prompt_in_result=False, **self._options(n))
        _check_count(self.name, [len(r.sequences_ids[0]) for r in results], n)

    def prefill(self, prompt: list[int]) -> None:
        # No last-position-only forward in CTranslate2's API (forward_batch computes logits
        # for every position): one generated token = the prompt's forward + one greedy pick.
        self.generate([prompt], 1)


def ct2_device(device: str) -> tuple[str, int]:
    """torch-style ``cuda:1`` -> CTranslate2's ``("cuda", 1)``."""
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


def _ct2_vocabulary(directory: Path) -> list[str]:
    path = directory / "vocabulary.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return (directory / "vocabulary.txt").read_text(encoding="utf-8").splitlines()


ENGINES = {"flagopt": FlagoptEngine, "transformers": TransformersEngine,
           "ctranslate2": CTranslate2Engine}
