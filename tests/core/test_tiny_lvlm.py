"""The tiny test models load through the same ``from_pretrained`` path users take."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lvlmva.testing.tiny_lvlm import (
    IMAGE_TOKEN,
    TINY_IMAGE_SIZE,
    TINY_PATCH_SIZE,
    build_tiny_causal_lm,
    train_tiny_tokenizer,
)

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

TOKENS_PER_IMAGE = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_lvlm_loads_with_auto_classes_and_generates_a_batch(tiny_lvlm_dir: Path) -> None:
    processor = transformers.AutoProcessor.from_pretrained(tiny_lvlm_dir)
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_lvlm_dir)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.padding_side == "left"

    image = Image.new("RGB", (56, 56), (200, 30, 30))
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": "long prompt " * 5},
                ],
            }
        ],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "short"}]}],
    ]
    texts = [
        processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in conversations
    ]
    assert texts[0].count(IMAGE_TOKEN) == 2 and texts[0].endswith("<|assistant|>\n")
    batch = processor(
        text=texts,
        images=[[image, image], [image]],
        padding=True,
        return_tensors="pt",
        add_special_tokens=False,
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    per_row = (batch["input_ids"] == image_id).sum(dim=1).tolist()
    assert per_row == [2 * TOKENS_PER_IMAGE, TOKENS_PER_IMAGE]
    # Left padding: the shorter row starts with pad tokens and ends with the prompt.
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()

    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)
    again = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, again)  # greedy decoding is deterministic


def test_causal_lm_loads_and_generates(tiny_causal_lm_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Judge."}, {"role": "user", "content": "Critique."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == "<s><|system|>\nJudge.</s>\n<|user|>\nCritique.</s>\n<|assistant|>\n"
    batch = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


def test_tokenizer_round_trips_any_text() -> None:
    tokenizer = train_tiny_tokenizer()
    text = '{"output": [{"color": "grey", "verdict": "no"}]} naïve ✓ 7'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != tokenizer.unk_token_id


def test_weights_depend_on_seed_only_and_global_rng_is_untouched(
    tmp_path: Path, tiny_causal_lm_dir: Path
) -> None:
    before = torch.random.get_rng_state()
    same = _state(build_tiny_causal_lm(tmp_path / "a", seed=0))
    other = _state(build_tiny_causal_lm(tmp_path / "b", seed=1))
    assert torch.equal(torch.random.get_rng_state(), before)
    reference = _state(tiny_causal_lm_dir)
    assert reference.keys() == same.keys()
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert any(not torch.equal(reference[k], other[k]) for k in reference)
