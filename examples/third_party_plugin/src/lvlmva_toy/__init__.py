"""lvlmva-toy: a minimal third-party plugin for lvlmva.

It adds a data set provider (``toy-stripes``) and an evaluator (``toy-eval``). The hooks live in
:mod:`lvlmva_toy.plugin`; the plugin classes are imported only when a run uses them.
"""

__version__ = "0.1.0"
