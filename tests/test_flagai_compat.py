"""FlagAI drop-in behaviour outside the loader: results that behave like ``str``, outputs
read by key, FlagAI's contrastive-search signature, the zoo's 30b/66b entries."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from flagopt.model.heads import (CausalLMOutput, OPTForCausalLM,
                                 OPTForQuestionAnswering, OPTForSequenceClassification)
from flagopt.predictor import GeneratedText, Predictor
from flagopt.tokenizer import OPTTokenizer
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


# --- GeneratedText: pickle / copy / deepcopy -----------------------------------------------------

def _text() -> GeneratedText:
    return GeneratedText("a continuation", truncated=True, finish_reason="eos", num_tokens=3)


@pytest.mark.parametrize("round_trip", [
    *[pytest.param(lambda t, p=p: pickle.loads(pickle.dumps(t, protocol=p)), id=f"pickle{p}")
      for p in range(pickle.HIGHEST_PROTOCOL + 1)],
    pytest.param(copy.copy, id="copy"),
    pytest.param(copy.deepcopy, id="deepcopy"),
])
def test_generated_text_round_trips_with_its_attributes(round_trip) -> None:
    text = _text()
    text.extra = [1, 2]  # an attribute a user added survives too
    back = round_trip(text)
    assert type(back) is GeneratedText and back == "a continuation"
    assert (back.truncated, back.finish_reason, back.num_tokens) == (True, "eos", 3)
    assert back.extra == [1, 2]


def test_generated_text_in_a_container_deep_copies() -> None:
    results = {"out": [_text()]}
    back = copy.deepcopy(results)
    assert back == results and back["out"][0].finish_reason == "eos"


# --- model outputs by key and by attribute -------------------------------------------------------

@pytest.fixture(scope="module")
def lm() -> OPTForCausalLM:
    torch.manual_seed(0)
    return OPTForCausalLM(tiny_config()).eval()


IDS = torch.tensor([[2, 5, 9, 14, 3]])


def test_causal_lm_output_by_key_as_flagai_code_reads_it(lm: OPTForCausalLM) -> None:
    data = {"input_ids": IDS, "labels": IDS}
    with torch.no_grad():
        out = lm(**data)
    assert out["logits"] is out.logits and out["loss"] is out.loss
    assert out.loss is not None and out["loss"].dim() == 0
    assert out[0] is out.logits and out[1] is out.loss  # HF's index form: set fields only
    assert "logits" in out and out.get("logits") is out.logits


def test_unset_fields_are_not_keys(lm: OPTForCausalLM) -> None:
    with torch.no_grad():
        out = lm(IDS)
    assert out.loss is None and "loss" not in out and out.get("loss") is None
    with pytest.raises(KeyError, match="loss"):
        out["loss"]
    assert list(out.keys()) == [k for k in ("logits", "loss", "cache", "hidden_states",
                                            "attentions") if getattr(out, k) is not None]
    assert dict(out.items())["logits"] is out.logits
    assert dict(**out).keys() == set(out.keys())  # ** unpacking works as for a dict
    assert list(out) == list(out.keys()) and len(out) == len(out.keys())
    assert out.to_tuple() == tuple(out.values())


def test_hidden_states_appear_as_keys_when_asked(lm: OPTForCausalLM) -> None:
    with torch.no_grad():
        out = lm(IDS, output_hidden_states=True)
    assert out["hidden_states"] is out.hidden_states and "hidden_states" in out.keys()


def test_every_output_class_reads_by_key() -> None:
    torch.manual_seed(0)
    config = tiny_config()
    with torch.no_grad():
        cls_out = OPTForSequenceClassification(tiny_config(num_labels=3)).eval()(IDS)
        qa_out = OPTForQuestionAnswering(config).eval()(IDS)
        dec_out = OPTForCausalLM(config).eval().model(IDS)
    assert cls_out["logits"].shape == (1, 3)
    assert qa_out["start_logits"] is qa_out.start_logits
    assert qa_out["end_logits"] is qa_out.end_logits
    assert dec_out["last_hidden_state"] is dec_out.last_hidden_state
    assert isinstance(CausalLMOutput(logits=torch.zeros(1)), CausalLMOutput)


# --- contrastive search: FlagAI's beam_size --------------------------------------------------

@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = OPTForCausalLM(tiny_config(vocab_size=50272)).eval()
    return Predictor(model, OPTTokenizer.default())


PROMPT = "DeepMind Company is"


def test_contrastive_beam_size_is_top_k_positionally_and_by_name(predictor) -> None:
    by_top_k = predictor.predict_generate_contrastive_search(PROMPT, 32, 6, top_k=3)
    flagai_positional = predictor.predict_generate_contrastive_search(PROMPT, 32, 6, 3)
    by_beam_size = predictor.predict_generate_contrastive_search(
        PROMPT, input_max_length=32, out_max_length=6, beam_size=3)
    both_equal = predictor.predict_generate_contrastive_search(PROMPT, 32, 6, beam_size=3,
                                                               top_k=3)
    assert by_top_k == flagai_positional == by_beam_size == both_equal
    other = predictor.predict_generate_contrastive_search(PROMPT, 32, 6, top_k=1)
    greedy = predictor.predict_generate_greedy(PROMPT, 32, 6)
    assert other == greedy  # one candidate is greedy: the count reaches the engine


def test_contrastive_default_candidate_count_is_four(predictor) -> None:
    assert predictor.predict_generate_contrastive_search(PROMPT, 32, 6) == \
        predictor.predict_generate_contrastive_search(PROMPT, 32, 6, top_k=4)


def test_contrastive_beam_size_and_top_k_that_differ_raise(predictor) -> None:
    with pytest.raises(ValueError, match=r"beam_size=2 and top_k=5"):
        predictor.predict_generate_contrastive_search(PROMPT, 32, 6, 2, top_k=5)
    with pytest.raises(ValueError, match="beam_size"):
        predictor.predict_generate_contrastive_search(PROMPT, 32, 6, beam_size=0)


# --- the zoo: opt-30b-en and opt-66b-en ------------------------------------------------------

BIG = {  # name: (layers, hidden, heads, ffn, shards), from the hub's config.json and file list
    "opt-30b-en": (48, 7168, 56, 28672, 7),
    "opt-66b-en": (64, 9216, 72, 36864, 14),
}


@pytest.mark.parametrize("name", sorted(BIG))
def test_big_zoo_entries_parse_with_their_architecture(name: str) -> None:
    from flagopt.auto_model.registry import get_model_spec
    from flagopt.model.config import OPTConfig

    layers, hidden, heads, ffn, shards = BIG[name]
    spec = get_model_spec(name)
    assert spec.repo == f"facebook/{name[:-3]}" and spec.revision == "main"
    arch = dict(spec.architecture)
    assert (arch["num_hidden_layers"], arch["hidden_size"], arch["num_attention_heads"],
            arch["ffn_dim"], arch["word_embed_proj_dim"]) == (layers, hidden, heads, ffn, hidden)
    config = OPTConfig(**arch)
    assert (config.vocab_size, config.max_position_embeddings) == (50272, 2048)
    assert config.do_layer_norm_before and config.head_dim == 128
    # parameters: embeddings (tied head) + positions + layers + final norm, counted by hand
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * ffn + ffn + hidden + 4 * hidden
    by_hand = 50272 * hidden + 2050 * hidden + layers * per_layer + 2 * hidden
    assert spec.parameters == config.num_parameters == by_hand
    assert spec.weight_files == (*[f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
                                   for i in range(1, shards + 1)],
                                 "pytorch_model.bin.index.json")
    assert set(spec.config_files) == {"config.json", "generation_config.json", "vocab.json",
                                      "merges.txt", "special_tokens_map.json",
                                      "tokenizer_config.json"}
    assert spec.sizes == {} and spec.sha256 == {}  # not known for certain, so not stated


def test_download_list_shows_the_big_models_with_an_estimated_size(
        capsys: pytest.CaptureFixture[str]) -> None:
    from flagopt.download import main

    assert main(["--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "facebook/opt-30b" in lines["opt-30b-en"] and "30.0B" in lines["opt-30b-en"]
    assert "~59.9 GB" in lines["opt-30b-en"]  # parameters x 2 bytes, marked as an estimate
    assert "facebook/opt-66b" in lines["opt-66b-en"] and "65.7B" in lines["opt-66b-en"]
    assert "~131.4 GB" in lines["opt-66b-en"]
