"""The scripted critic, where plugin authors' tests import it from: it is a built-in critic
(``plugin = "scripted"``) in :mod:`lvlmva.plugins.critics.scripted`."""

from __future__ import annotations

from lvlmva.plugins.critics.scripted import ScriptedCritic

__all__ = ["ScriptedCritic"]
