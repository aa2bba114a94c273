"""The hook module named by this package's ``lvlmva`` entry point."""

from __future__ import annotations

from lvlmva import PluginRegistry, hookimpl


@hookimpl
def lvlmva_register(registry: PluginRegistry) -> None:
    """Add the toy plugins as lazy ``"module:Class"`` strings: nothing heavy is imported until a
    run selects them."""
    registry.add("dataset", "toy-stripes", "lvlmva_toy.stripes:StripesProvider")
    registry.add("evaluator", "toy-eval", "lvlmva_toy.evaluate:AccuracyEvaluator")
