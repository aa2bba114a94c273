"""Tiny, randomly initialised Hugging Face models for tests of local-model backends.

``build_tiny_lvlm`` writes an image-text-to-text model (LLaVA: a one-layer CLIP vision tower, a
two-layer Llama text model), ``build_tiny_causal_lm`` a text-only Llama. Both come with a
byte-level BPE tokenizer trained here from a fixed corpus and a chat template, are saved with
``save_pretrained`` and load back through ``AutoProcessor`` / ``AutoTokenizer`` and
``AutoModelForImageTextToText`` / ``AutoModelForCausalLM``, the path users take with real
models. Nothing is downloaded. The answers of such a model are gibberish: use it to test
mechanics (prompting, batching, caching, validation), not quality.

transformers and tokenizers are imported inside the functions so that importing
``lvlmva.testing`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_TOKEN",
    "TINY_IMAGE_SIZE",
    "TINY_PATCH_SIZE",
    "TINY_CHAT_TEMPLATE",
    "build_tiny_lvlm",
    "build_tiny_causal_lm",
    "train_tiny_tokenizer",
]

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
#: Side of the (square) images the tiny vision tower sees.
TINY_IMAGE_SIZE = 32
#: Patch side of the tiny vision tower: (32 / 8)^2 = 16 image tokens per image.
TINY_PATCH_SIZE = 8
_VOCAB_SIZE = 512

#: A chat template that accepts string contents and list contents with ``{"type": "image"}``
#: and ``{"type": "text", "text": ...}`` items, like the templates of real LVLMs.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A fixed corpus, so that the trained tokenizer is the same on every machine. Byte-level BPE
# can encode any text whatever the corpus; the corpus only shapes which merges exist.
_CORPUS = (
    "You are shown three images of a handwritten digit: the original, a map of clusters and "
    "an overlay. Describe every cluster, whether it supports the class and whether it covers "
    "a spurious feature such as a grey square in a corner, a marker or a bandage.",
    'Answer with JSON: {"output": [{"color": "red", "verdict": "yes"}, '
    '{"color": "blue", "verdict": "no"}]}',
    "red blue green yellow pink brown grey orange purple cluster colour color verdict yes no",
    "The digit seven has a horizontal stroke at the top and a diagonal stroke downwards.",
    "Verdict: yes. Verdict: no. The cluster covers the corner square, which is spurious.",
    "0 1 2 3 4 5 6 7 8 9 osteoarthritis knee lesion benign malignant asymmetric border",
)


def train_tiny_tokenizer(vocab_size: int = _VOCAB_SIZE) -> Any:
    """A byte-level BPE tokenizer trained on a fixed corpus, wrapped for transformers
    (``PreTrainedTokenizerFast``) with pad/bos/eos, the ``<image>`` token and
    :data:`TINY_CHAT_TEMPLATE`. Pads on the left, as batched generation needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _tiny_llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _generation_config(tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        max_new_tokens=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny_lvlm(path: Path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA image-text-to-text model, its tokenizer and its processor to
    ``path`` (created if needed) and return ``path``.

    Load it with ``AutoProcessor.from_pretrained(path)`` and
    ``AutoModelForImageTextToText.from_pretrained(path)``. Images are resized to
    :data:`TINY_IMAGE_SIZE` and each ``<image>`` in a prompt becomes 16 image tokens. The
    weights depend only on ``seed``; the global torch RNG is left as it was.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    num_patches = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_tiny_llama_config(tokenizer),
        image_token_index=image_token_id,
        image_seq_length=num_patches,
        # "default" drops the CLS token: one text position per patch.
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tokenizer)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=TINY_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        # The CLS token the vision tower adds (and "default" then removes again).
        num_additional_image_tokens=1,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_causal_lm(path: Path, seed: int = 0) -> Path:
    """Write a tiny random text-only Llama causal LM and its tokenizer (with a chat template)
    to ``path`` and return ``path``; load with ``AutoTokenizer`` + ``AutoModelForCausalLM``."""
    import torch
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_tiny_llama_config(tokenizer)).eval()
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
