"""Expert review of a run's verdicts in the browser (``lvlmva review RUN_DIR``).

:mod:`lvlmva.review.server` serves one page per run directory: a card per alignment sample
with its three rendered images, the critic's answers, the judge's verdict per colour and a
toggle per colour, and the mask the current verdicts give. Every toggle is saved at once in
``review/overrides.json`` (:mod:`lvlmva.overrides`); the next ``lvlmva compose`` applies the
overrides and recomputes masks onward.
"""
