"""LVLM critics and judges. The flows, written once (``flow``: prompts, cache, answer checks
(``answers``, ``verdict_schema``), repair, bounded re-asks, transcripts, failure kinds), ask a
transport (``transport``: the seam) for answers: the OpenAI-compatible server
(``openai_transport``; OpenAI's Batch API in ``batch_transport``; plugins in ``openai_backend``)
or a local Hugging Face model (``transformers_transport`` on ``local_models``, plugins in
``transformers_backend``). Prompt templates are in ``prompts``, the response cache in ``cache``.

Nothing is imported here, so that a run using one backend never imports the other's client
library (``openai`` or ``transformers``).
"""
