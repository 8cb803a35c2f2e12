"""Tokenizer fixtures and reference outputs of tiny transformers text encoders (issue 3).

Topic "tokenizers" writes tests/fixtures/tokenizers/:
  clip/  a transformers CLIPTokenizer folder built from open_clip's copy of OpenAI's BPE merges
         (the 49408-token vocabulary of openai/clip-vit-large-patch14, pad = <|endoftext|> as FLUX's)
  t5/    a T5TokenizerFast folder around a small sentencepiece unigram model trained here
  reference.json  token ids of sample strings from independent tokenizers (open_clip, sentencepiece)

Topic "text_encoders" writes tests/fixtures/text_encoders/: tiny CLIPTextModel / T5EncoderModel
folders (FLUX-shaped configs), BF16 and sharded copies, and cases.safetensors with their outputs for
several prompts (padding, truncation), including what diffusers' FluxPipeline.encode_prompt returns.

Besides the torch extra, the tokenizers topic reads open_clip_torch's tokenizer module and BPE file
(loaded without the package, whose import needs torchvision), with ftfy and regex.
"""

from __future__ import annotations

import copy
import io
import json
import random
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "grey",
           "cyan", "magenta", "teal", "violet", "gold", "silver", "navy", "beige", "maroon", "olive", "turquoise"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "hexagon", "pentagon", "octagon", "diamond", "heart",
          "cross", "ring", "ellipse", "oval", "crescent", "arrow", "spiral", "cube", "sphere", "cone", "cylinder"]
SIZES = ["small", "large", "tiny", "big", "huge", "medium-sized", "little"]
PLACES = ["in the center", "at the top", "at the bottom", "on the left", "on the right", "in the top left corner",
          "in the bottom right corner", "near the edge"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SUBJECTS = ["the cat", "a dog", "my neighbour", "the old man", "a young woman", "the children", "our teacher",
            "the farmer", "a painter", "the bird", "an astronaut", "the robot", "a photographer", "the chef"]
VERBS = ["looks at", "paints", "carries", "finds", "draws", "likes", "remembers", "watches", "builds", "opens",
         "describes", "follows", "photographs", "cleans"]
OBJECTS = ["a wooden table", "the river", "a bright lamp", "the mountains", "an empty street", "a glass of water",
           "the city at night", "a field of flowers", "the morning sky", "a stack of books", "a sleeping fox",
           "the ocean waves", "a red bicycle", "the snowy forest", "a cup of coffee", "an old castle"]
STYLES = ["a photo of", "a painting of", "a drawing of", "a watercolor of", "a sketch of", "a render of",
          "a close-up photo of", "an illustration of"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "She sells sea shells by the sea shore.",
    "A picture is worth a thousand words.",
    "Please write your name at the top of the page.",
    "We walked along the beach until the sun went down.",
    "The weather today is sunny with a light breeze from the west.",
    "He opened the window and listened to the rain.",
    "Numbers like 1, 2, 3 and 42 appear in many sentences.",
    "Do you know where the nearest train station is?",
    "Artists often mix colours on a palette before painting.",
    "The museum shows modern art, old maps and ancient coins.",
    "High resolution images take longer to generate.",
    "Cinematic lighting, sharp focus, highly detailed, 4k.",
]
SPECIAL_PROMPTS = [
    "a photo of a cat",
    "a red circle on a white background",
    "a blue triangle on a black background",
    "A small GREEN square in the center of a gray background, digital art",
]


def _common_words(count: int) -> list[str]:
    """English words in the order OpenAI's BPE learned them (earliest merges = most frequent)."""
    import gzip

    merges = gzip.open(_open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")[1:]
    words = []
    for merge in merges:
        word = merge.replace(" ", "")
        if word.endswith("</w>") and word[:-4].isascii() and word[:-4].isalpha() and len(word) >= 7:
            words.append(word[:-4])
            if len(words) == count:
                break
    return words


def t5_corpus() -> list[str]:
    """A deterministic English + caption corpus (seeded generator, fixed word lists)."""
    rng = random.Random(1234)
    lines = list(SENTENCES) + list(SPECIAL_PROMPTS)
    vocabulary = _common_words(2000)
    for _ in range(1500):
        lines.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    for colour in COLOURS:
        for shape in SHAPES:
            for background in rng.sample(COLOURS, 3):
                lines.append(f"a {colour} {shape} on a {background} background")
    for _ in range(4000):
        colour, shape, background = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(COLOURS)
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"a {rng.choice(SIZES)} {colour} {shape} {rng.choice(PLACES)} of a {background} background")
        elif kind == 1:
            number = rng.choice(NUMBERS[1:])
            lines.append(f"{number} {colour} {shape}s on a {background} background")
        elif kind == 2:
            lines.append(f"{rng.choice(STYLES)} {rng.choice(OBJECTS)} next to a {colour} {shape}")
        else:
            subject, verb, obj = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
            lines.append(f"{subject.capitalize()} {verb} {obj} {rng.choice(PLACES)}.")
    return lines


# Strings whose token ids the tests check against independent tokenizers.
CLIP_SAMPLES = [
    "a red circle on a white background",
    "A small GREEN square in the center of a gray background, digital art",
    "Hello,   World!! It's 3.14 o'clock... isn't it?",
    "naïve café — “quoted” words, an emoji 🐱 and ümlauts",
    "photorealistic, 8k, trending on artstation",
    "",
]
T5_SAMPLES = [
    "a red circle on a white background",
    "a blue triangle on a black background",
    "Two magenta hexagons in the top left corner of a navy background.",
    "The quick brown fox jumps over the lazy dog.",
    "unseen words: xylophone quasar zeppelin!",
    "",
]


def _open_clip_dir() -> Path:
    # open_clip's package __init__ needs torchvision; only its tokenizer module and BPE file are used.
    import importlib.util

    return Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])


def _open_clip_tokenizer():
    """OpenAI's reference BPE tokenizer as open_clip ships it, loaded without the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", _open_clip_dir() / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def _clip_vocab_files(folder: Path) -> None:
    """vocab.json and merges.txt laid out as OpenAI's tokenizer builds its vocabulary: 256 byte
    symbols, the same with </w>, one token per merge, then the two special tokens."""
    import gzip

    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    bpe = _open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408
    folder.mkdir(parents=True, exist_ok=True)
    # on one line, as on the Hub (indentation would add 300 KB)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _write_clip_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    _clip_vocab_files(folder)
    # pad = <|endoftext|> and clean-up of decoded spaces, as the Hub's openai/clip-vit-large-patch14 has them
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=77, clean_up_tokenization_spaces=True)
    tokenizer.save_pretrained(str(folder))
    _clip_vocab_files(folder)  # save_pretrained rewrote them indented; the content is the same


def _train_sentencepiece() -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_corpus()), model_writer=model, model_type="unigram", vocab_size=1000,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
        # no NFKC table: it would add 600 KB to the fixtures and these prompts are plain ASCII
        normalization_rule_name="identity",
        shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
    )
    return model.getvalue()


def _write_t5_tokenizer(folder: Path) -> None:
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(_train_sentencepiece())
    # add_prefix_space: sentencepiece's dummy prefix ("▁" before the first word), as google's T5
    # tokenizer.json has it. Once in tokenizer.json it is dropped from tokenizer_config.json, where it
    # would make every from_pretrained re-convert the slow tokenizer.
    tokenizer = T5TokenizerFast(vocab_file=str(folder / "spiece.model"), extra_ids=100, legacy=True,
                                model_max_length=512, add_prefix_space=True, clean_up_tokenization_spaces=True)
    tokenizer.save_pretrained(str(folder))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    del config["add_prefix_space"]
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tokenizers(out: Path) -> None:
    """Build both tokenizer folders and check them against independent tokenizers."""
    import sentencepiece as spm
    from transformers import CLIPTokenizer, T5Tokenizer, T5TokenizerFast

    _write_clip_tokenizer(out / "clip")
    _write_t5_tokenizer(out / "t5")

    # CLIP: open_clip's tokenizer is OpenAI's reference implementation of this BPE.
    clip = CLIPTokenizer.from_pretrained(str(out / "clip"))
    reference = _open_clip_tokenizer()
    assert (len(clip), clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (49408, 49406, 49407, 49407)
    clip_cases = []
    for text in CLIP_SAMPLES:
        ids = [reference.sot_token_id] + reference.encode(text) + [reference.eot_token_id]
        assert clip(text).input_ids == ids, (text, clip(text).input_ids, ids)
        clip_cases.append({"text": text, "input_ids": ids})

    # T5: sentencepiece itself is the reference; the slow and fast transformers tokenizers must agree.
    sp = spm.SentencePieceProcessor(model_file=str(out / "t5" / "spiece.model"))
    fast = T5TokenizerFast.from_pretrained(str(out / "t5"))
    slow = T5Tokenizer(str(out / "t5" / "spiece.model"), extra_ids=100, legacy=True)
    assert (fast.pad_token_id, fast.eos_token_id, fast.unk_token_id, len(fast)) == (0, 1, 2, 1100)
    t5_cases = []
    for text in T5_SAMPLES:
        ids = sp.encode(text) + [sp.eos_id()]
        assert fast(text).input_ids == slow(text).input_ids == ids, (text, fast(text).input_ids, ids)
        t5_cases.append({"text": text, "input_ids": ids})
    # every caption word of the later demo model is covered (no <unk> pieces)
    captions = " ".join(COLOURS + SHAPES + SIZES + PLACES + ["background"])
    assert sp.unk_id() not in sp.encode(captions)
    _write_cases(out / "reference.json", {"clip": clip_cases, "t5": t5_cases})


def _write_cases(path: Path, cases: dict) -> None:
    """JSON with one case per line: readable and diff-friendly."""
    blocks = []
    for key, items in cases.items():
        lines = ",\n".join("    " + json.dumps(item, ensure_ascii=False) for item in items)
        blocks.append(f"  {json.dumps(key)}: [\n{lines}\n  ]")
    path.write_text("{\n" + ",\n".join(blocks) + "\n}\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# text encoders
# --------------------------------------------------------------------------------------------
# FLUX.1's text_encoder / text_encoder_2 configs, shrunk: same vocabularies, activations, eps,
# bucket settings, and CLIP's legacy eos_token_id = 2 (pooling at argmax(input_ids)).
CLIP_CONFIG = dict(vocab_size=49408, hidden_size=16, intermediate_size=37, projection_dim=16, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5_CONFIG = dict(vocab_size=1152, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                 dropout_rate=0.1, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
# A CLIP with the current eos convention (first eos position) and an "added token" above the eos id,
# so that argmax pooling and first-eos pooling disagree; erf gelu; fewer positions than inputs may use.
CLIP_EOS_CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=24, projection_dim=16, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-5,
                       bos_token_id=61, eos_token_id=62, pad_token_id=62)
CLIP_EOS_IDS = [[61, 5, 63, 17, 62, 62, 62, 62, 62, 62, 62, 62],
                [61, 9, 10, 11, 12, 13, 14, 62, 63, 62, 62, 62]]
# Original T5's feed-forward (not gated, relu) and a small bucket range that 24 tokens saturate.
T5_RELU_CONFIG = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="relu",
                      dropout_rate=0.1, layer_norm_epsilon=1e-6)
LONG_PROMPT = ("A highly detailed photograph of a small red circle and a large blue triangle on a white background, "
               "next to a green square, a yellow star, a purple hexagon and an orange diamond, soft studio lighting, "
               "sharp focus, shallow depth of field, shot on a medium format camera with a fifty millimetre lens, warm "
               "colours, gentle shadows, clean composition, minimalist style, trending on artstation, award winning, "
               "the end of this prompt is cut off by both tokenizers")
PROMPTS = ["a red circle on a white background", "A small GREEN square in the center of a gray background, digital art",
           "", LONG_PROMPT]
T5_MAX_LENGTH = 32  # FLUX uses 512 (dev) / 256 (schnell); "t5_long" runs 256
NUM_IMAGES_PER_PROMPT = 2


def tokenizers_folder(out: Path) -> Path:
    """The tokenizers regenerated in this run if there are any, else the committed ones."""
    fresh = out.parent / "tokenizers"
    return fresh if (fresh / "clip").is_dir() else FIXTURES / "tokenizers"


def _init_weights(model, generator, scale: float = 1.0) -> None:
    """Weights large enough that attention is far from uniform and every norm and bias shows."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                value = (1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(param.shape, generator=generator)
            elif "embedding" in name or "relative_attention_bias" in name or name == "shared.weight":
                value = torch.randn(param.shape, generator=generator)
            elif param.ndim == 2:
                value = scale * torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5
            else:
                value = 0.1 * torch.randn(param.shape, generator=generator)
            param.copy_(value)


def _clip_model(config: dict, generator):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    _init_weights(model, generator, scale=1.5)
    return model


def _t5_model(config: dict, generator):
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(**config)).eval()
    _init_weights(model, generator)
    return model


def _encoder_outputs(prefix: str, model, input_ids, attention_mask=None, hidden_states: bool = False) -> dict:
    import torch

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states)
    arrays = {f"{prefix}.last_hidden_state": out.last_hidden_state}
    if getattr(out, "pooler_output", None) is not None:
        arrays[f"{prefix}.pooler_output"] = out.pooler_output
    for index, state in enumerate(out.hidden_states or ()):
        arrays[f"{prefix}.hidden_states.{index}"] = state
    return arrays


def _removed_text(tokenizer, prompt: str, max_length: int) -> str:
    """What truncation to `max_length` tokens drops from a prompt (the final special token is kept)."""
    ids = tokenizer(prompt, verbose=False).input_ids
    return tokenizer.decode(ids[max_length - 1:-1]) if len(ids) > max_length else ""


def make_reference(out: Path) -> None:
    import torch
    from diffusers import FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast
    from transformers.models.t5.modeling_t5 import T5Attention

    from .torch_common import save_arrays, seed

    tokenizers = tokenizers_folder(out)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizers / "clip"))
    tokenizer_2 = T5TokenizerFast.from_pretrained(str(tokenizers / "t5"))
    arrays = {}

    # CLIP, FLUX-shaped, stored as BF16 as FLUX.1 ships it: the reference runs the rounded weights in fp32.
    clip = _clip_model(CLIP_CONFIG, seed(300))
    clip.to(torch.bfloat16).save_pretrained(out / "clip")
    clip.to(torch.float32)
    text = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert len(tokenizer(LONG_PROMPT, verbose=False).input_ids) > 77
    arrays["clip.input_ids"], arrays["clip.attention_mask"] = text.input_ids, text.attention_mask
    arrays.update(_encoder_outputs("clip", clip, text.input_ids, hidden_states=True))
    arrays.update(_encoder_outputs("clip.masked", clip, text.input_ids, text.attention_mask))

    # CLIP whose pooling takes the first eos position; the same weights with eos_token_id = 2 pool at argmax.
    clip_eos = _clip_model(CLIP_EOS_CONFIG, seed(301))
    clip_eos.save_pretrained(out / "clip_eos")
    ids = torch.tensor(CLIP_EOS_IDS)
    arrays["clip_eos.input_ids"] = ids
    arrays.update(_encoder_outputs("clip_eos", clip_eos, ids))
    clip_eos.config.eos_token_id = clip_eos.text_model.eos_token_id = 2
    arrays.update(_encoder_outputs("clip_eos.legacy", clip_eos, ids))
    assert not torch.equal(arrays["clip_eos.pooler_output"], arrays["clip_eos.legacy.pooler_output"])

    # T5, FLUX-shaped, fp32; then BF16 and sharded copies of it.
    t5 = _t5_model(T5_CONFIG, seed(302))
    t5.save_pretrained(out / "t5")
    t5.save_pretrained(out / "t5_sharded", max_shard_size="20KB")
    text = tokenizer_2(PROMPTS, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_tensors="pt")
    assert len(tokenizer_2(LONG_PROMPT, verbose=False).input_ids) > T5_MAX_LENGTH
    arrays["t5.input_ids"], arrays["t5.attention_mask"] = text.input_ids, text.attention_mask
    arrays.update(_encoder_outputs("t5", t5, text.input_ids, hidden_states=True))
    arrays.update(_encoder_outputs("t5.masked", t5, text.input_ids, text.attention_mask))
    # schnell's 256 tokens: relative distances beyond max_distance share the last buckets
    long_ids = tokenizer_2(PROMPTS[1], padding="max_length", max_length=256, return_tensors="pt").input_ids
    arrays["t5_long.input_ids"] = long_ids
    arrays["t5_long.last_hidden_state"] = _encoder_outputs("t5_long", t5, long_ids)["t5_long.last_hidden_state"]
    rounded = copy.deepcopy(t5).to(torch.bfloat16)  # the reference is the bf16-rounded weights run in fp32
    rounded.save_pretrained(out / "t5_bf16")
    arrays.update(_encoder_outputs("t5_bf16", rounded.to(torch.float32), text.input_ids))

    t5_relu = _t5_model(T5_RELU_CONFIG, seed(303))
    t5_relu.save_pretrained(out / "t5_relu")
    ids = torch.randint(0, T5_RELU_CONFIG["vocab_size"], (2, 24), generator=seed(304))
    arrays["t5_relu.input_ids"] = ids
    arrays.update(_encoder_outputs("t5_relu", t5_relu, ids))

    # T5's bucket of every relative position (memory - query) in [-600, 600], for both bucket settings
    relative = torch.arange(-600, 601)
    arrays["buckets.relative_position"] = relative
    for cfg in (T5_CONFIG, T5_RELU_CONFIG):
        buckets, distance = cfg["relative_attention_num_buckets"], cfg["relative_attention_max_distance"]
        arrays[f"buckets.{buckets}_{distance}"] = T5Attention._relative_position_bucket(
            relative, bidirectional=True, num_buckets=buckets, max_distance=distance)

    # What diffusers' FluxPipeline feeds its transformer for these prompts.
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=None)
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=T5_MAX_LENGTH,
                                                      num_images_per_prompt=NUM_IMAGES_PER_PROMPT)
    arrays["flux.prompt_embeds"], arrays["flux.pooled_prompt_embeds"] = prompt_embeds, pooled
    save_arrays(out / "cases.safetensors", arrays)
    meta = {"prompts": PROMPTS, "t5_max_length": T5_MAX_LENGTH, "num_images_per_prompt": NUM_IMAGES_PER_PROMPT,
            "clip_removed_text": [_removed_text(tokenizer, p, 77) for p in PROMPTS],
            "t5_removed_text": [_removed_text(tokenizer_2, p, T5_MAX_LENGTH) for p in PROMPTS]}
    (out / "prompts.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_mindflux_copy(out: Path) -> None:
    """MindSpore stage: mindflux saves a CLIP (fp32) and a T5 (BF16 shards) for transformers to read back."""
    import mindflux
    from mindflux import CLIPTextModel, T5EncoderModel

    mindflux.set_device("cpu", "pynative")
    CLIPTextModel.from_pretrained(str(out / "clip_eos")).save_pretrained(str(out / "mindflux_saved_clip"))
    t5 = T5EncoderModel.from_pretrained(str(out / "t5"))
    t5.to("bf16").save_pretrained(str(out / "mindflux_saved_t5_bf16"), max_shard_size="20KB")


def load_mindflux_copy(out: Path) -> None:
    """Torch stage: transformers loads what mindflux saved (by class and by Auto*); its outputs are the
    references for those folders."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    from .torch_common import save_arrays

    cases = load_file(str(out / "cases.safetensors"))
    arrays = {}
    clip, info = AutoModel.from_pretrained(str(out / "mindflux_saved_clip"), output_loading_info=True)
    assert type(clip).__name__ == "CLIPTextModel" and not any(info.values()), (type(clip), info)
    assert clip.config.eos_token_id == CLIP_EOS_CONFIG["eos_token_id"]
    arrays.update(_encoder_outputs("clip", clip.eval(), torch.from_numpy(cases["clip_eos.input_ids"])))
    assert type(AutoConfig.from_pretrained(str(out / "mindflux_saved_t5_bf16"))).__name__ == "T5Config"
    t5, info = T5EncoderModel.from_pretrained(str(out / "mindflux_saved_t5_bf16"), output_loading_info=True)
    assert not any(info.values()), info
    assert t5.dtype == torch.float32
    arrays.update(_encoder_outputs("t5", t5.eval(), torch.from_numpy(cases["t5.input_ids"])))
    save_arrays(out / "mindflux_saved.safetensors", arrays)
