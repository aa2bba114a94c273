"""The transformers Critic and Judge on tiny random models built in the test session.

A random model answers gibberish, so these tests check the mechanics: prompts with images,
batched generation in order, the cache, transcripts, and that the Judge records gibberish as a
failure while a scripted valid answer becomes the right verdicts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lvlmva.plugins.lvlm import transformers_backend as backend
from lvlmva.plugins.lvlm.answers import critic_answer_problem
from lvlmva.plugins.lvlm.cache import ResponseCache, sha256_hex
from lvlmva.plugins.lvlm.prompts import load_template, render_critic_prompt
from lvlmva.plugins.lvlm.transformers_backend import (
    TransformersCritic,
    TransformersJudge,
    load_local_model,
)
from lvlmva.protocols import RunContext
from lvlmva.records import Critique, CritiqueRequest, RenderedSample
from lvlmva.registry import get_registry
from lvlmva.testing.tiny_lvlm import (
    IMAGE_TOKEN,
    TINY_IMAGE_SIZE,
    TINY_PATCH_SIZE,
)

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

COLORS = ("red", "blue", "green")
#: a critic answer that can be used: it discusses every colour of COLORS
WHOLE = "Red: on the digit. Verdict: yes. Blue: a corner. Verdict: no. Green: a stroke. Verdict: yes"
TOKENS_PER_IMAGE = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2


def _png(color: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _request(sample_id: int, shade: int) -> CritiqueRequest:
    rendered = RenderedSample(
        sample_id=sample_id,
        original=_png((shade, shade, shade)),
        clusters=_png((255, 0, shade)),
        overlay=_png((shade, 0, 255)),
        colors=COLORS,
        files=tuple(
            f"critic/sample_{sample_id}_{kind}.png" for kind in ("original", "clusters", "overlay")
        ),
    )
    return CritiqueRequest(
        sample_id=sample_id,
        label="7",
        class_description="A seven: a top bar and a diagonal stroke.",
        family="decoy-mnist",
        rendered=rendered,
        cluster_map=torch.zeros(4, 4, dtype=torch.int64),
    )


def _critique(sample_id: int, text: str | None = "Red: on the digit. Verdict: yes") -> Critique:
    failure = None if text is not None else "timed out"
    if text is not None:
        # Distinct texts: identical critiques would rightly share one cache entry.
        text = f"{text} (sample {sample_id})"
    return Critique(sample_id, COLORS, text, failure, family="decoy-mnist", label="7")


def _transcripts(ctx: RunContext) -> list[dict[str, Any]]:
    path = ctx.run_dir / "transcripts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _cached_answers(ctx: RunContext) -> list[str]:
    path = ctx.cache_dir / "responses.sqlite"
    if not path.exists():
        return []
    with ResponseCache(path) as cache:
        return sorted(row[0] for row in cache._conn().execute("SELECT answer FROM responses"))


class GenerateSpy:
    """Wraps ``generate`` of a model class: records each call's inputs and can script answers.

    A scripted answer ends with the end-of-sequence token unless ``cut_off(call, row)`` says
    that ``max_new_tokens`` ran out first."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type, tokenizer: Any) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.script: Callable[[int, int], str] | None = None  # (call, row) -> answer text
        self.cut_off: Callable[[int, int], bool] = lambda call, row: False
        self.tokenizer = tokenizer
        real = cls.generate
        spy = self

        def generate(model: Any, **inputs: Any) -> torch.Tensor:
            spy.calls.append({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            if spy.script is None:
                return real(model, **inputs)
            return spy._scripted(inputs["input_ids"], len(spy.calls) - 1)

        monkeypatch.setattr(cls, "generate", generate)

    def _scripted(self, input_ids: torch.Tensor, call: int) -> torch.Tensor:
        tok = self.tokenizer
        rows, ended = [], []
        for r in range(input_ids.shape[0]):
            ids = tok(self.script(call, r), add_special_tokens=False)["input_ids"]
            ended.append(not self.cut_off(call, r))
            rows.append(ids + [tok.eos_token_id] if ended[-1] else ids)
        width = max(map(len, rows))
        # Finished rows are padded (pad may be eos); a cut-off row runs on with more words.
        new = torch.tensor(
            [
                row + ([tok.pad_token_id] if end else row[-1:]) * (width - len(row))
                for row, end in zip(rows, ended, strict=True)
            ]
        )
        return torch.cat([input_ids, new], dim=1)

    def prompt(self, call: int, row: int) -> str:
        return self.tokenizer.decode(self.calls[call]["input_ids"][row], skip_special_tokens=True)


def _valid_json(verdicts: tuple[str, ...]) -> str:
    items = [{"color": c, "verdict": v} for c, v in zip(COLORS, verdicts, strict=True)]
    return json.dumps({"output": items})


# -- registration and options ---------------------------------------------------------------


def test_registered_under_lazy_paths_with_flags() -> None:
    registry = get_registry()
    assert registry.get("critic", "transformers") is TransformersCritic
    assert registry.get("judge", "transformers") is TransformersJudge
    assert not TransformersCritic.needs_true_masks
    assert TransformersCritic.__doc__.splitlines()[0]
    for cls in (TransformersCritic, TransformersJudge):
        for name, info in cls.Options.model_fields.items():
            assert info.description, f"{cls.__name__}.Options.{name} has no description"


def test_options_reject_unknown_keys_and_bad_dtype() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TransformersCritic.Options(model="x", temperature=0.3)
    with pytest.raises(ValidationError):
        TransformersJudge.Options(model="x", dtype="int8")
    with pytest.raises(ValidationError):
        TransformersJudge.Options()  # model is required


def test_importing_the_backend_does_not_import_transformers() -> None:
    code = (
        "import sys, lvlmva, lvlmva.plugins.lvlm.transformers_backend; "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_resolve_dtype() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backend.resolve_dtype("auto", cpu) is torch.float32
    assert backend.resolve_dtype("auto", cuda) == "auto"
    assert backend.resolve_dtype("bfloat16", cpu) is torch.bfloat16


# -- critic ---------------------------------------------------------------------------------


def test_critic_batches_prompts_with_images_and_matches_a_direct_generate(
    tiny_lvlm_dir: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = transformers.AutoProcessor.from_pretrained(tiny_lvlm_dir)
    spy = GenerateSpy(monkeypatch, transformers.LlavaForConditionalGeneration, processor.tokenizer)
    requests = [_request(10, 0), _request(11, 128), _request(12, 250)]
    options = TransformersCritic.Options(
        model=str(tiny_lvlm_dir), max_new_tokens=6, batch_size=2, cache=False
    )
    critiques = TransformersCritic(options).critique(requests, ctx)

    assert [c.sample_id for c in critiques] == [10, 11, 12]
    assert all(
        c.family == "decoy-mnist" and c.label == "7" and c.colors == COLORS for c in critiques
    )
    assert all(c.usage.requests == 1 and c.usage.cache_hits == 0 for c in critiques)
    # Two generate calls (batches of 2 and 1), each row with three images' worth of tokens.
    assert len(spy.calls) == 2
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    first = spy.calls[0]
    assert first["pixel_values"].shape == (6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert (first["input_ids"] == image_id).sum(dim=1).tolist() == [3 * TOKENS_PER_IMAGE] * 2
    template = load_template("decoy-mnist", "critic")
    for call, row, request in [(0, 0, requests[0]), (0, 1, requests[1]), (1, 0, requests[2])]:
        assert render_critic_prompt(template, request) in spy.prompt(call, row)
    assert "A seven: a top bar and a diagonal stroke." in spy.prompt(0, 0)

    # Reference: the same prompt through the plain transformers path, one sample at a time.
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_lvlm_dir)
    eos = torch.tensor(model.generation_config.eos_token_id).reshape(-1)
    answered = {line["sample_id"]: line["answer"] for line in _transcripts(ctx)}
    for request, critique in zip(requests, critiques, strict=True):
        chat = [
            {
                "role": "user",
                "content": [{"type": "image"}] * 3
                + [{"type": "text", "text": render_critic_prompt(template, request)}],
            }
        ]
        text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        images = [Image.open(io.BytesIO(png)).convert("RGB") for png in request.rendered.images]
        batch = processor(
            text=[text], images=[images], return_tensors="pt", add_special_tokens=False
        )
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        new = out[:, batch["input_ids"].shape[1] :]
        expected = processor.batch_decode(new, skip_special_tokens=True)[0].strip()
        assert expected, "the tiny model answered nothing: pick another seed or prompt"
        assert answered[request.sample_id] == expected
        # six random tokens rarely end the answer, and never discuss three colours: unusable
        finish = "stop" if torch.isin(new, eos).any() else "length"
        problem = critic_answer_problem(expected, finish, COLORS, ("max_new_tokens", 6))
        if problem is None:
            assert critique.text == expected
        else:
            assert critique.text is None and critique.failure == problem
            # without the cache nothing can count unusable answers: a recorded failure at once
            assert not critique.retryable

    lines = _transcripts(ctx)
    assert [line["sample_id"] for line in lines] == [10, 11, 12]
    line = lines[0]
    assert line["stage"] == "critic" and line["backend"] == "transformers"
    assert line["cache_hit"] is False and line["attempts"] == 1
    assert [img["file"] for img in line["images"]] == list(requests[0].rendered.files)
    assert line["images"][0]["sha256"] == sha256_hex(requests[0].rendered.original)
    assert "red, blue, green" in line["prompt"]


def test_critic_reads_the_cache_without_loading_the_model(
    tiny_lvlm_dir: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = transformers.AutoProcessor.from_pretrained(tiny_lvlm_dir)
    spy = GenerateSpy(monkeypatch, transformers.LlavaForConditionalGeneration, processor.tokenizer)
    spy.script = lambda call, row: f"answer {call}-{row}: red is on the digit, blue and green are not."
    options = TransformersCritic.Options(model=str(tiny_lvlm_dir), max_new_tokens=8, batch_size=4)
    requests = [_request(1, 10), _request(2, 20)]
    first = TransformersCritic(options).critique(requests, ctx)
    assert [c.text for c in first] == [
        "answer 0-0: red is on the digit, blue and green are not.",
        "answer 0-1: red is on the digit, blue and green are not.",
    ]
    assert len(spy.calls) == 1

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model must not be loaded when every answer is cached")

    monkeypatch.setattr(backend, "load_local_model", refuse)
    second = TransformersCritic(options).critique(requests, ctx)
    assert [c.text for c in second] == [c.text for c in first]
    assert all(c.usage.cache_hits == 1 and c.usage.requests == 0 for c in second)
    assert len(spy.calls) == 1
    assert [line["cache_hit"] for line in _transcripts(ctx)] == [False, False, True, True]

    # A changed image is a different question; --refresh asks again.
    monkeypatch.undo()
    spy = GenerateSpy(monkeypatch, transformers.LlavaForConditionalGeneration, processor.tokenizer)
    spy.script = lambda call, row: "fresh: red, blue, green"
    changed = dataclasses.replace(
        requests[0], rendered=dataclasses.replace(requests[0].rendered, overlay=_png((1, 2, 3)))
    )
    assert TransformersCritic(options).critique([changed, requests[1]], ctx)[0].text == "fresh: red, blue, green"
    assert len(spy.calls) == 1 and spy.calls[0]["input_ids"].shape[0] == 1
    refreshed = dataclasses.replace(ctx, refresh=True)
    assert [c.text for c in TransformersCritic(options).critique(requests, refreshed)] == [
        "fresh: red, blue, green"
    ] * 2
    assert len(spy.calls) == 2


def test_critic_records_generation_errors_as_failures(
    tiny_lvlm_dir: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = transformers.AutoProcessor.from_pretrained(tiny_lvlm_dir)
    spy = GenerateSpy(monkeypatch, transformers.LlavaForConditionalGeneration, processor.tokenizer)

    def script(call: int, row: int) -> str:
        if call == 0:
            raise RuntimeError("CUDA out of memory (simulated)")
        return "" if row == 0 else WHOLE

    spy.script = script
    options = TransformersCritic.Options(model=str(tiny_lvlm_dir), batch_size=2)
    out = TransformersCritic(options).critique([_request(i, i) for i in range(4)], ctx)
    assert [c.sample_id for c in out] == [0, 1, 2, 3]
    assert all("simulated" in c.failure and c.text is None and c.retryable for c in out[:2])
    # an empty answer: unusable, stored apart, asked again (1 of max_invalid_attempts = 2)
    assert out[2].text is None and "empty" in out[2].failure and out[2].retryable
    assert out[3].text == WHOLE and not out[3].retryable
    assert _cached_answers(ctx) == [WHOLE]
    # Failures are never cached as answers: a second run asks for the three failed samples again.
    spy.script = lambda call, row: "now: red, blue, green"
    again = TransformersCritic(options).critique([_request(i, i) for i in range(4)], ctx)
    assert [c.text for c in again] == ["now: red, blue, green"] * 3 + [WHOLE]


def test_critic_answer_cut_off_at_max_new_tokens_is_a_failure_and_not_cached(
    tiny_lvlm_dir: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = transformers.AutoProcessor.from_pretrained(tiny_lvlm_dir)
    spy = GenerateSpy(monkeypatch, transformers.LlavaForConditionalGeneration, processor.tokenizer)
    spy.script = lambda call, row: [WHOLE, "Red: on the dig"][row]
    spy.cut_off = lambda call, row: row == 1
    options = TransformersCritic.Options(model=str(tiny_lvlm_dir), max_new_tokens=30, max_invalid_attempts=1)
    out = TransformersCritic(options).critique([_request(0, 0), _request(1, 1)], ctx)
    assert out[0].text == WHOLE
    assert out[1].text is None and not out[1].retryable
    assert out[1].failure == (
        "critic answer cut off at max_new_tokens = 30; raise critic.max_new_tokens (1 unusable "
        "answers, critic.max_invalid_attempts = 1: not asked again; lvlmva compose --retry-invalid "
        "asks once more)"
    )
    assert _cached_answers(ctx) == [WHOLE]
    assert _transcripts(ctx)[1]["answer"].startswith("Red: on the dig")


# -- judge ----------------------------------------------------------------------------------


def test_judge_turns_gibberish_into_a_recorded_failure(
    tiny_causal_lm_dir: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    spy = GenerateSpy(monkeypatch, transformers.LlamaForCausalLM, tokenizer)
    options = TransformersJudge.Options(
        model=str(tiny_causal_lm_dir), max_new_tokens=12, batch_size=2
    )
    verdicts = TransformersJudge(options).judge([_critique(3), _critique(4)], ctx)
    assert [v.sample_id for v in verdicts] == [3, 4]
    for v in verdicts:
        assert not v.ok and v.relevant is None
        assert v.attempts == 2 and "invalid judge answer after 2 answer(s)" in v.failure
        assert v.usage.requests == 2 and v.retryable  # 1 of max_invalid_attempts = 2
    assert len(spy.calls) == 2  # one batch, then one retry batch
    # The retry carries the first answer and the validation error.
    assert "could not be used" in spy.prompt(1, 0)
    lines = _transcripts(ctx)
    assert len(lines) == 2 and all(line["verdicts"] is None and line["failure"] for line in lines)
    assert [len(line["answers"]) for line in lines] == [2, 2]
    assert [line["attempts"] for line in lines] == [2, 2]
    # Nothing invalid was cached as an answer: the next run asks again.
    assert _cached_answers(ctx) == []
    TransformersJudge(options).judge([_critique(3)], ctx)
    assert len(spy.calls) == 4


def test_judge_scripted_answers_give_verdicts_retry_and_cache(
    tiny_causal_lm_dir: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    spy = GenerateSpy(monkeypatch, transformers.LlamaForCausalLM, tokenizer)
    answers = {
        (0, 0): "Sure! ```json\n" + _valid_json(("yes", "no", "yes")) + "\n```",
        (0, 1): '{"output": [{"color": "red", "verdict": "maybe"}]}',
        (1, 0): _valid_json(("no", "no", "yes")),
    }
    spy.script = lambda call, row: answers[(call, row)]
    options = TransformersJudge.Options(model=str(tiny_causal_lm_dir), batch_size=8)
    critiques = [_critique(5), _critique(6), _critique(7, text=None)]
    verdicts = TransformersJudge(options).judge(critiques, ctx)

    assert [v.sample_id for v in verdicts] == [5, 6, 7]
    assert verdicts[0].relevant == (True, False, True) and verdicts[0].attempts == 1
    assert verdicts[1].relevant == (False, False, True) and verdicts[1].attempts == 2
    assert verdicts[2].relevant is None and verdicts[2].failure == "no critique to judge: timed out"
    assert verdicts[2].attempts == 0
    assert len(spy.calls) == 2 and spy.calls[1]["input_ids"].shape[0] == 1
    retry_prompt = spy.prompt(1, 0)
    assert "maybe" in retry_prompt and "could not be used" in retry_prompt
    # The instructions went in as the system message, the critique as the user message.
    first_prompt = spy.prompt(0, 0)
    assert "<|system|>" in first_prompt and "Red: on the digit. Verdict: yes" in first_prompt

    lines = _transcripts(ctx)
    assert [line["sample_id"] for line in lines] == [7, 5, 6]  # as each is done; 6 answered twice
    assert "no critique to judge" in lines[0]["failure"] and lines[0]["attempts"] == 0
    assert lines[2]["answers"] == [answers[(0, 1)], answers[(1, 0)]] and len(lines[2]["validation_errors"]) == 1
    ok = [line for line in lines if line["verdicts"] is not None]
    assert {line["sample_id"]: line["verdicts"] for line in ok} == {
        5: {"red": "yes", "blue": "no", "green": "yes"},
        6: {"red": "no", "blue": "no", "green": "yes"},
    }
    # The valid answers only, the repaired one under the first prompt's key.
    assert _cached_answers(ctx) == sorted([answers[(0, 0)], answers[(1, 0)]])

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model must not be loaded when every answer is cached")

    monkeypatch.setattr(backend, "load_local_model", refuse)
    again = TransformersJudge(options).judge(critiques[:2], ctx)
    assert [v.relevant for v in again] == [verdicts[0].relevant, verdicts[1].relevant]
    assert all(v.usage.cache_hits == 1 for v in again)
    assert len(spy.calls) == 2


def test_judge_generation_errors_are_retryable_and_cut_off_answers_say_so(
    tiny_causal_lm_dir: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    spy = GenerateSpy(monkeypatch, transformers.LlamaForCausalLM, tokenizer)

    def script(call: int, row: int) -> str:
        if call == 0:
            raise RuntimeError("CUDA out of memory (simulated)")
        return '{"output": [{"color": "red", "verdict": "yes"}, {"col'

    spy.script = script
    spy.cut_off = lambda call, row: True
    options = TransformersJudge.Options(
        model=str(tiny_causal_lm_dir), max_new_tokens=16, max_invalid_attempts=1
    )
    [failed] = TransformersJudge(options).judge([_critique(1)], ctx)
    assert failed.retryable and failed.failure.startswith("generation failed: RuntimeError")
    [cut] = TransformersJudge(options).judge([_critique(1)], ctx)
    assert not cut.retryable and cut.failure.startswith("invalid judge answer after 2 answer(s)")
    assert "cut off at max_new_tokens = 16; raise judge.max_new_tokens) (1 unusable" in cut.failure
    assert _cached_answers(ctx) == []
    lines = _transcripts(ctx)
    assert [line["retryable"] for line in lines] == [True, False]
    assert [line["asked"] for line in lines] == ["missing", "failed in transport"]


def test_judge_sets_extra_colours_aside_also_when_read_from_the_cache(
    tiny_causal_lm_dir: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    spy = GenerateSpy(monkeypatch, transformers.LlamaForCausalLM, tokenizer)
    items = [{"color": "pink", "verdict": "no"}] + json.loads(_valid_json(("yes", "no", "yes")))[
        "output"
    ]
    spy.script = lambda call, row: json.dumps({"output": items})
    options = TransformersJudge.Options(model=str(tiny_causal_lm_dir))
    [first] = TransformersJudge(options).judge([_critique(2)], ctx)
    [again] = TransformersJudge(options).judge([_critique(2)], ctx)
    assert len(spy.calls) == 1 and again.usage.cache_hits == 1
    for v in (first, again):
        assert v.relevant == (True, False, True) and v.ignored_colors == ("pink",)
    assert [line["ignored_colors"] for line in _transcripts(ctx)] == [["pink"], ["pink"]]


def test_preflight_checks_model_folder_device_and_template(
    tiny_causal_lm_dir: Path, tmp_path: Path
) -> None:
    assert (
        TransformersJudge(TransformersJudge.Options(model=str(tiny_causal_lm_dir))).preflight(4)
        == []
    )
    # A Hugging Face id is left to from_pretrained.
    assert TransformersJudge(TransformersJudge.Options(model="org/some-model")).preflight(4) == []
    absent = str(tmp_path / "no-such-model")
    [problem] = TransformersCritic(TransformersCritic.Options(model=absent)).preflight(4)
    assert problem == f"critic 'transformers': critic.model {absent!r} is not a folder"
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last device, if any
    options = TransformersJudge.Options(model=str(tiny_causal_lm_dir), device=device)
    assert TransformersJudge(options).preflight(4) == [
        f"judge 'transformers': judge.device = {device!r}, but no such CUDA device"
    ]
    options = TransformersJudge.Options(
        model=str(tiny_causal_lm_dir), template=tmp_path / "absent.toml"
    )
    [problem] = TransformersJudge(options).preflight(4)
    assert problem.startswith("judge 'transformers': ") and "no such judge template" in problem


def test_judge_on_an_image_text_to_text_model_without_images(
    tiny_lvlm_dir: Path, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = load_local_model(str(tiny_lvlm_dir), device=torch.device("cpu"), images=False)
    assert local.accepts_images and local.tokenizer.padding_side == "left"
    spy = GenerateSpy(monkeypatch, transformers.LlavaForConditionalGeneration, local.tokenizer)
    spy.script = lambda call, row: _valid_json(("no", "yes", "yes"))
    options = TransformersJudge.Options(model=str(tiny_lvlm_dir), system_role=False, cache=False)
    verdicts = TransformersJudge(options).judge([_critique(9)], ctx)
    assert verdicts[0].relevant == (False, True, True)
    assert "pixel_values" not in spy.calls[0]
    assert "<|system|>" not in spy.prompt(0, 0)


def test_causal_lm_cannot_be_a_critic(tiny_causal_lm_dir: Path) -> None:
    with pytest.raises(ValueError, match="not an image-text-to-text model"):
        load_local_model(str(tiny_causal_lm_dir), device=torch.device("cpu"), images=True)


def test_missing_family_is_an_error(tiny_causal_lm_dir: Path, ctx: RunContext) -> None:
    options = TransformersJudge.Options(model=str(tiny_causal_lm_dir))
    critique = dataclasses.replace(_critique(1), family="")
    with pytest.raises(ValueError, match="no template family"):
        TransformersJudge(options).judge([critique], ctx)


@pytest.mark.gpu
def test_critic_and_judge_on_cuda_in_bfloat16(
    tiny_lvlm_dir: Path, tiny_causal_lm_dir: Path, ctx: RunContext
) -> None:
    critic = TransformersCritic(
        TransformersCritic.Options(
            model=str(tiny_lvlm_dir), device="cuda", dtype="bfloat16", max_new_tokens=4, cache=False
        )
    )
    critiques = critic.critique([_request(0, 0), _request(1, 99)], ctx)
    assert [c.sample_id for c in critiques] == [0, 1]
    assert critic._local.model.device.type == "cuda"
    assert critic._local.model.dtype is torch.bfloat16
    judge = TransformersJudge(
        TransformersJudge.Options(
            model=str(tiny_causal_lm_dir),
            device="cuda",
            dtype="bfloat16",
            max_new_tokens=8,
            cache=False,
        )
    )
    verdicts = judge.judge([_critique(0), _critique(1)], ctx)
    assert [v.sample_id for v in verdicts] == [0, 1]
    assert all(v.failure and v.attempts == 2 for v in verdicts)
