"""Tokenizer fixtures and the prompt-encoding helpers against open_clip, sentencepiece and diffusers'
FluxPipeline.encode_prompt (tests/parity/dump_text_encoders.py)."""

import json
import logging
import sys

import numpy as np
import pytest
from transformers import CLIPTokenizer, T5TokenizerFast
from transformers.utils import logging as hf_logging

from mindflux import CLIPTextModel, T5EncoderModel
from mindflux.text_encoding import encode_clip_pooled, encode_prompt, encode_t5, tokenize
from tests.conftest import FIXTURES, load_cases, max_abs_diff

TOKENIZERS = FIXTURES / "tokenizers"
DUMPS = FIXTURES / "text_encoders"
TOL = 1e-4
META = json.loads((DUMPS / "prompts.json").read_text(encoding="utf-8"))
PROMPTS = META["prompts"]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(str(TOKENIZERS / "clip"))


@pytest.fixture(scope="module")
def tokenizer_2():
    return T5TokenizerFast.from_pretrained(str(TOKENIZERS / "t5"))


@pytest.fixture(scope="module")
def encoders():
    return CLIPTextModel.from_pretrained(str(DUMPS / "clip")), T5EncoderModel.from_pretrained(str(DUMPS / "t5"))


@pytest.fixture(scope="module")
def cases():
    return load_cases(DUMPS / "cases.safetensors")


def reference(name: str) -> list[dict]:
    return json.loads((TOKENIZERS / "reference.json").read_text(encoding="utf-8"))[name]


def test_no_torch_in_the_process():
    # transformers imports torch when it may; mindflux keeps it out (torch and MindSpore in one process)
    assert "torch" not in sys.modules


def test_clip_tokenizer_matches_openai_bpe(tokenizer):
    # reference ids: OpenAI's BPE tokenizer as open_clip ships it
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id) == (49408, 49406, 49407)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.model_max_length == 77
    for case in reference("clip"):
        assert tokenizer(case["text"]).input_ids == case["input_ids"], case["text"]


def test_t5_tokenizer_matches_sentencepiece(tokenizer_2):
    assert tokenizer_2.is_fast
    assert (tokenizer_2.pad_token_id, tokenizer_2.eos_token_id, tokenizer_2.unk_token_id) == (0, 1, 2)
    assert len(tokenizer_2) == 1100 and tokenizer_2.model_max_length == 512  # 1000 pieces + 100 <extra_id_*>
    for case in reference("t5"):
        assert tokenizer_2(case["text"]).input_ids == case["input_ids"], case["text"]


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_tokenize_pads_truncates_and_warns(tokenizer, tokenizer_2, cases, caplog, which):
    tok, max_length = (tokenizer, 77) if which == "clip" else (tokenizer_2, META["t5_max_length"])
    hf_logging.enable_propagation()  # so that caplog also sees transformers' own warnings
    try:
        with caplog.at_level(logging.WARNING):
            ids = tokenize(tok, PROMPTS, max_length, which.upper())
    finally:
        hf_logging.disable_propagation()
    np.testing.assert_array_equal(ids, cases[f"{which}.input_ids"])  # as transformers tokenized them for the dump
    warnings = [r.getMessage() for r in caplog.records if r.name == "mindflux.text_encoding"]
    removed = [text for text in META[f"{which}_removed_text"] if text]
    assert len(warnings) == len(removed) == 1  # only the long prompt, and it says what was cut off
    assert removed[0] in warnings[0] and str(max_length) in warnings[0]
    assert "Token indices sequence length" not in caplog.text  # no second warning, from transformers


def test_encode_prompt_matches_flux_pipeline(encoders, tokenizer, tokenizer_2, cases):
    clip, t5 = encoders
    n = META["num_images_per_prompt"]
    prompt_embeds, pooled, text_ids = encode_prompt(clip, tokenizer, t5, tokenizer_2, PROMPTS,
                                                    max_sequence_length=META["t5_max_length"],
                                                    num_images_per_prompt=n)
    assert prompt_embeds.shape == (len(PROMPTS) * n, META["t5_max_length"], t5.config.d_model)
    assert max_abs_diff(prompt_embeds, cases["flux.prompt_embeds"]) <= TOL
    assert max_abs_diff(pooled, cases["flux.pooled_prompt_embeds"]) <= TOL
    np.testing.assert_array_equal(text_ids.asnumpy(), np.zeros((META["t5_max_length"], 3), np.float32))


def test_encode_helpers_take_one_string(encoders, tokenizer, tokenizer_2, cases):
    clip, t5 = encoders
    pooled = encode_clip_pooled(clip, tokenizer, PROMPTS[0])
    assert max_abs_diff(pooled, cases["clip.pooler_output"][:1]) <= TOL
    embeds = encode_t5(t5, tokenizer_2, PROMPTS[0], max_sequence_length=META["t5_max_length"])
    assert max_abs_diff(embeds, cases["t5.last_hidden_state"][:1]) <= TOL


def test_bad_prompts_are_refused(encoders, tokenizer, tokenizer_2):
    clip, t5 = encoders
    with pytest.raises(TypeError, match="prompt"):
        encode_clip_pooled(clip, tokenizer, [])
    with pytest.raises(TypeError, match="prompt"):
        encode_t5(t5, tokenizer_2, ["fine", None])
    with pytest.raises(ValueError, match="same length"):
        encode_prompt(clip, tokenizer, t5, tokenizer_2, ["a", "b"], prompt_2=["c"])
    with pytest.raises(ValueError, match="max_sequence_length"):
        encode_t5(t5, tokenizer_2, "a", max_sequence_length=0)
