"""LVLM critics and judges: the OpenAI-compatible backend (``openai_backend``), the local
Hugging Face backend (``transformers_backend``), and what both share: prompt templates
(``prompts``), judge answer validation (``verdict_schema``) and the response cache (``cache``).

Nothing is imported here, so that a run using one backend never imports the other's client
library (``openai`` or ``transformers``).
"""
