"""Every mitigator's training loops checkpoint (lvlmva.checkpoints): a mitigation interrupted
half-way through its checkpoints and run again resumes from them and returns the same weights,
byte for byte, and the same details as one that was never interrupted. The stateful parts each
method adds to ``Trainer.fit`` (JTT's error sets, GroupDRO's group weights, LfF's moving
averages, RWY/RWG's draws, the epoch selector) are what a resume must restore."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lvlmva.checkpoints import Checkpoints
from lvlmva.plugins.models.mlp import MlpFactory
from lvlmva.protocols import RunContext
from lvlmva.records import TrainedModel
from lvlmva.registry import get_registry
from lvlmva.settings import TrainOptions
from lvlmva.testing.data import planted_spurious_dataset
from lvlmva.training import Trainer

OPTIONS = {
    "erm": {"epochs": 3},
    "jtt": {"epochs": 2, "t_grid": [1, 2], "lambda_up_grid": [4]},
    "subg": {"epochs": 3},
    "suby": {"epochs": 3},
    "rwy": {"epochs": 3},
    "rwg": {"epochs": 3},
    "groupdro": {"epochs": 3},
    "lff": {"epochs": 3},
    "afr": {"epochs": 3, "gamma_grid": [0.5], "lambda_grid": [0.0], "head_epochs": 20},
}


class _Interrupted(Exception):
    pass


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _mitigate(name: str, tmp_path, checkpoints: Checkpoints | None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = planted_spurious_dataset([[60, 8], [8, 60]], [[20, 4], [4, 20]], [[12, 6], [6, 12]], seed=3)
    ctx = RunContext(seed=4, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=tmp_path, cache_dir=tmp_path, checkpoints=checkpoints)  # fmt: skip
    factory = MlpFactory(MlpFactory.Options(hidden=[16]))
    trainer = Trainer(lambda: factory.build(data.input_shape, data.num_classes), TrainOptions(epochs=3, lr=1e-2, batch_size=32), ctx)  # fmt: skip
    cls = get_registry().get("mitigator", name)
    torch.manual_seed(0)  # as the pipeline seeds every stage
    out = cls(cls.Options(**OPTIONS[name])).mitigate(None, trainer, data, ctx)
    model, details = (out.model, out.details) if isinstance(out, TrainedModel) else (out, {})
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue(), json.dumps(_without_times(details), sort_keys=True, default=str)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_mitigation_interrupted_half_way_resumes_to_the_same_weights_and_details(name, tmp_path, monkeypatch):
    reference = _mitigate(name, tmp_path / "reference", None)
    folder = tmp_path / "checkpoints"
    counted = Checkpoints(tmp_path / "counted", every=1, minutes=None)
    assert _mitigate(name, tmp_path / "counted-run", counted) == reference  # checkpointing changes nothing
    assert counted.saved >= 3, f"{name}: its loops took {counted.saved} checkpoints"

    stop_after = counted.saved // 2 + 1
    original_save = Checkpoints.save

    def save_then_stop(self, key, state):
        original_save(self, key, state)
        if self.saved == stop_after:
            raise _Interrupted

    monkeypatch.setattr(Checkpoints, "save", save_then_stop)
    with pytest.raises(_Interrupted):
        _mitigate(name, tmp_path / "interrupted", Checkpoints(folder, every=1, minutes=None, log=lambda e: None))
    monkeypatch.setattr(Checkpoints, "save", original_save)

    events: list[dict] = []
    resumed = Checkpoints(folder, every=1, minutes=None, log=events.append)
    assert _mitigate(name, tmp_path / "resumed", resumed) == reference
    assert resumed.resumed, f"{name}: nothing was resumed"
    assert all(e["event"] == "resumed" for e in events), events  # every part could be saved
    assert resumed.saved < counted.saved  # the work before the interruption was not redone


def test_chained_callbacks_checkpoint_only_when_every_callback_can(tmp_path):
    from lvlmva.checkpoints import stateful
    from lvlmva.plugins.mitigators.reweighting import ChainedCallbacks
    from lvlmva.plugins.mitigators.validation import EpochSelector

    data = planted_spurious_dataset([[20, 4], [4, 20]], [[5, 5], [5, 5]], [[5, 5], [5, 5]], seed=1)
    selector = EpochSelector(None, data, 4)  # type: ignore[arg-type]
    assert stateful(ChainedCallbacks(selector, selector))
    assert not stateful(ChainedCallbacks(selector, lambda end: None))  # saving it would fail mid-fit
    events: list[dict] = []
    ctx = RunContext(seed=0, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=tmp_path, cache_dir=tmp_path,
                     checkpoints=Checkpoints(tmp_path / "c", every=1, minutes=None, log=events.append))  # fmt: skip
    factory = MlpFactory(MlpFactory.Options(hidden=[4]))
    trainer = Trainer(lambda: factory.build(data.input_shape, data.num_classes), TrainOptions(epochs=2, batch_size=16), ctx)
    trainer.fit(data.train, on_epoch=ChainedCallbacks(lambda end: None), tag="mine")
    assert [(e["event"], e["tag"]) for e in events] == [("not-checkpointed", "mine")]
    assert not (tmp_path / "c").exists()
