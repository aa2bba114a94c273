"""Tests of BalancingGroups' other baselines: SUBY (class-balanced subsample), RWY and RWG
(class- and group-balanced draws with replacement) and GroupDRO (online group weights): the
subsample, the draws and the weights against the reference procedures written out, GroupDRO's
update by hand, the refusals, and worst-group accuracy against ERM on planted-spurious data."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import WeightedRandomSampler

from lvlmva.plugins.mitigators.erm import ErmMitigator
from lvlmva.plugins.mitigators.groupdro import (
    GroupDroMitigator,
    GroupDroObjective,
    group_mean_losses,
)
from lvlmva.plugins.mitigators.reweighting import (
    RwgMitigator,
    RwyMitigator,
    WeightedDraws,
    inverse_frequency_weights,
)
from lvlmva.plugins.mitigators.suby import SubyMitigator, subsample_classes
from lvlmva.plugins.mitigators.validation import split_scores
from lvlmva.protocols import Mitigator, RunContext, check_capabilities
from lvlmva.records import TrainedModel
from lvlmva.testing.data import planted_spurious_dataset
from lvlmva.testing.trainers import RecordingTrainer

MITIGATORS = {
    "suby": SubyMitigator,
    "rwy": RwyMitigator,
    "rwg": RwgMitigator,
    "groupdro": GroupDroMitigator,
}


def _planted(seed: int = 0):
    """Two classes, the patch on its class's side in 95 % of training images."""
    return planted_spurious_dataset(
        [[200, 10], [10, 200]], [[100, 10], [10, 100]], [[20, 20], [20, 20]], seed=seed
    )


def _unbalanced(seed: int = 0):
    """Class 0 has 90 training images, class 1 has 30; groups 90 = 80 + 10, 30 = 5 + 25."""
    return planted_spurious_dataset(
        [[80, 10], [5, 25]], [[10, 10], [10, 10]], [[10, 10], [10, 10]], seed=seed
    )


SpyTrainer = RecordingTrainer


def _run(name, data, ctx, *, trainer=None, **options):
    trainer = trainer or SpyTrainer(data, ctx)
    plugin = MITIGATORS[name](MITIGATORS[name].Options(**options))
    return plugin.mitigate(None, trainer, data, ctx), trainer


# -- what all four share ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MITIGATORS))
def test_satisfy_the_protocol_and_declare_what_they_read(name):
    cls = MITIGATORS[name]
    assert isinstance(cls(cls.Options()), Mitigator) and check_capabilities("mitigator", cls) == []
    assert cls.needs_groups == (name in ("rwg", "groupdro")) and cls.needs_validation
    assert cls.__doc__ and all(f.description for f in cls.Options.model_fields.values())
    assert cls.Options().selection == "worst-group" and cls.Options().select_epoch


@pytest.mark.parametrize("name", sorted(MITIGATORS))
def test_details_record_the_choice_and_the_model_scores_what_they_say(name, ctx):
    data = _planted()
    result, trainer = _run(name, data, ctx)
    assert isinstance(result, TrainedModel)
    details = json.loads(json.dumps(result.details))  # plain JSON
    assert details["method"] == name and details["models_trained"] == 1
    assert "worst-group accuracy" in details["criterion"] and details["epoch_rule"]
    assert details["selection"]["rule"] == "worst-group"
    (point,) = details["grid"]
    assert len(point["epochs"]) == 3
    chosen = details["chosen"]
    assert chosen["index"] == 0 and chosen["params"] == point["params"]
    assert chosen["val"] == point["val"] and chosen["epoch"] == point["epoch"]
    logits = trainer.predict(result.model, data.val.images)
    assert split_scores(logits, data.val, 4) == pytest.approx(chosen["val"])
    (call,) = trainer.calls
    assert call["tag"] == name and call["split"] is data.train


@pytest.mark.parametrize("name", sorted(MITIGATORS))
def test_the_selection_rule_is_the_options(name, ctx):
    data = _planted()
    no_val_groups = dataclasses.replace(data, val=dataclasses.replace(data.val, groups=None))
    plugin = MITIGATORS[name](MITIGATORS[name].Options())
    (problem,) = plugin.check_data(no_val_groups)
    assert "needs group labels on the validation split" in problem
    result, _ = _run(name, no_val_groups, ctx, selection="worst-class", epochs=2)
    assert result.details["selection"]["rule"] == "worst-class"
    assert result.details["chosen"]["val"]["worst_group_accuracy"] is None


@pytest.mark.parametrize("name", sorted(MITIGATORS))
def test_refuse_data_without_validation_before_training(name, ctx):
    data = dataclasses.replace(_planted(), val=None)
    plugin = MITIGATORS[name](MITIGATORS[name].Options())
    (problem,) = plugin.check_data(data)
    assert "needs a validation split" in problem and name in problem
    trainer = SpyTrainer(data, ctx)
    with pytest.raises(ValueError, match="needs a validation split"):
        plugin.mitigate(None, trainer, data, ctx)
    assert trainer.calls == []


@pytest.mark.parametrize("name", ["rwg", "groupdro"])
def test_group_methods_refuse_training_without_groups_or_with_an_empty_group(name, ctx):
    data = _planted()
    plugin = MITIGATORS[name](MITIGATORS[name].Options())
    no_groups = dataclasses.replace(data, train=dataclasses.replace(data.train, groups=None))
    (problem,) = plugin.check_data(no_groups)
    assert f"{name} needs group labels on the training split" in problem
    empty = planted_spurious_dataset([[50, 0], [5, 50]], [[5, 5], [5, 5]], [[5, 5], [5, 5]])
    (problem,) = plugin.check_data(empty)
    assert "1 group(s) have no training samples: '0/patch-1' (group 1)" in problem
    trainer = SpyTrainer(empty, ctx)
    with pytest.raises(ValueError, match="no training samples"):
        plugin.mitigate(None, trainer, empty, ctx)
    assert trainer.calls == []


@pytest.mark.parametrize("name", ["suby", "rwy"])
def test_class_methods_need_no_training_groups_but_every_class(name, ctx):
    data = _planted()
    plugin = MITIGATORS[name](MITIGATORS[name].Options())
    no_groups = dataclasses.replace(data, train=dataclasses.replace(data.train, groups=None))
    assert plugin.check_data(no_groups) == []
    # class 1 has validation samples but no training samples
    train = data.train.subset(torch.nonzero(data.train.labels == 0).flatten())
    missing = dataclasses.replace(data, train=train)
    (problem,) = plugin.check_data(missing)
    assert "1 class(es) have no training samples: class 'class-1'" in problem and name in problem
    trainer = SpyTrainer(missing, ctx)
    with pytest.raises(ValueError, match="no training samples"):
        plugin.mitigate(None, trainer, missing, ctx)
    assert trainer.calls == []


@pytest.mark.parametrize("name", sorted(MITIGATORS))
def test_the_test_split_is_never_read(name, ctx):
    data = _planted()
    nan_test = dataclasses.replace(data.test, images=torch.full_like(data.test.images, math.nan))
    runs = [_run(name, dataclasses.replace(data, test=t), ctx)[0] for t in (data.test, nan_test)]
    assert runs[0].details == runs[1].details
    a, b = runs[0].model.state_dict(), runs[1].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- SUBY ----------------------------------------------------------------------------------------


def test_suby_keeps_the_first_of_the_permutation_in_every_class():
    labels = torch.tensor([0] * 40 + [1] * 7 + [2] * 25)[torch.randperm(72)]
    kept = subsample_classes(labels, 3, torch.Generator().manual_seed(4))
    # BalancingGroups' subsample_("classes") loop over the same permutation, written out.
    perm = torch.randperm(72, generator=torch.Generator().manual_seed(4)).tolist()
    counts, expected = [0, 0, 0], []
    for p in perm:
        if counts[int(labels[p])] < 7:
            counts[int(labels[p])] += 1
            expected.append(p)
    assert kept.indices.tolist() == expected
    assert kept.min_size == 7 and kept.cell_sizes.tolist() == [40, 7, 25]
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no samples"):
        subsample_classes(labels, 4, torch.Generator())


def test_suby_trains_on_the_class_subsample_whatever_the_groups(ctx):
    data = _unbalanced()
    result, trainer = _run("suby", data, ctx)
    (call,) = trainer.calls
    expected = subsample_classes(data.train.labels, 2, ctx.generator("suby")).indices
    assert torch.equal(call["indices"], expected)
    assert torch.bincount(data.train.labels[expected]).tolist() == [30, 30]
    # class 1 is kept whole; class 0's groups are what the permutation gave
    assert torch.equal(torch.sort(expected[data.train.labels[expected] == 1]).values,
                       torch.nonzero(data.train.labels == 1).flatten())  # fmt: skip
    assert result.details["subsample"] == {
        "min_size": 30, "kept": 60, "of": 120, "class_sizes": [90, 30]
    }  # fmt: skip
    assert result.details["chosen"]["params"] == {"min_size": 30}


# -- RWY and RWG ---------------------------------------------------------------------------------


def test_inverse_frequency_weights_are_balancing_groups_wy_and_wg():
    cells = torch.tensor([0, 0, 0, 2, 2, 1, 0, 0])  # sizes 5, 1, 2 of N = 8
    weights = inverse_frequency_weights(cells, 4)  # cell 3 is empty: no sample carries it
    assert weights.dtype == torch.float64
    assert weights.tolist() == [8 / 5, 8 / 5, 8 / 5, 8 / 2, 8 / 2, 8 / 1, 8 / 5, 8 / 5]
    # each non-empty cell carries a third of the total weight: a third of the draws
    per_cell = torch.zeros(4, dtype=torch.float64).index_add(0, cells, weights)
    assert (per_cell / weights.sum()).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])


def test_weighted_draws_are_the_reference_sampler_epoch_after_epoch():
    cells = torch.tensor([0] * 30 + [1] * 3 + [2] * 7)
    weights = inverse_frequency_weights(cells, 3)
    draws = WeightedDraws(weights, torch.Generator().manual_seed(11), cells=cells, num_cells=3)
    # BalancingGroups' sampler, seeded the same: one list per epoch (a DataLoader's iteration)
    sampler = WeightedRandomSampler(
        weights.tolist(), len(weights), generator=torch.Generator().manual_seed(11)
    )
    for epoch in (1, 2, 3):
        assert torch.equal(draws(epoch), torch.tensor(list(sampler)))
    assert [sum(c) for c in draws.drawn_per_cell] == [40, 40, 40]
    # the draws are one seeded sequence: asked out of order is an error
    with pytest.raises(RuntimeError, match="asked in order"):
        draws(2)


@pytest.mark.parametrize(("name", "by"), [("rwy", "labels"), ("rwg", "groups")])
def test_reweighting_trains_on_a_fresh_balanced_draw_every_epoch(name, by, ctx):
    data = _unbalanced()
    cells = getattr(data.train, by)
    size = 2 if name == "rwy" else 4
    result, trainer = _run(name, data, ctx, epochs=4)
    (call,) = trainer.calls
    generator = ctx.generator(name)
    weights = inverse_frequency_weights(cells, size)
    visited = []
    for end in call["ends"]:
        drawn = torch.multinomial(weights, 120, True, generator=generator)
        assert torch.equal(torch.sort(end.order).values, torch.sort(drawn).values)
        visited.append(torch.bincount(cells[end.order], minlength=size).tolist())
    assert len({tuple(v) for v in visited}) > 1  # drawn anew each epoch
    sampling = result.details["sampling"]
    assert sampling["drawn_per_epoch"] == visited
    assert sampling["by"] == ("class" if name == "rwy" else "group")
    sizes = [90, 30] if name == "rwy" else [80, 10, 5, 25]
    assert sampling["sizes"] == sizes
    assert sampling["sample_weights"] == pytest.approx([120 / s for s in sizes])
    assert sampling["cell_probabilities"] == pytest.approx([1 / size] * size)
    # balanced in expectation: 4 epochs of 120 draws, each cell near 480 / size
    total = torch.tensor(visited).sum(0).double() / 480
    assert total.tolist() == pytest.approx([1 / size] * size, abs=0.1)


# -- GroupDRO ------------------------------------------------------------------------------------


def test_group_mean_losses_give_an_absent_group_zero():
    losses = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0])
    groups = torch.tensor([0, 0, 1, 3, 3])
    assert group_mean_losses(losses, groups, 4).tolist() == [2.0, 2.0, 0.0, 5.0]


def test_groupdro_q_after_hand_computed_steps():
    torch.manual_seed(3)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    all_groups = torch.tensor([9, 0, 0, 1, 3, 3, 9])  # the split's groups; the batch is 1..5
    idx = torch.arange(1, 6)
    objective = GroupDroObjective(all_groups.clamp(max=3), 4, eta=0.5)
    loss, logits = objective(model, x, y, idx)
    ce = F.cross_entropy(model(x), y, reduction="none").detach()
    group_loss = [(ce[0] + ce[1]) / 2, ce[2], 0.0, (ce[3] + ce[4]) / 2]  # group 2 absent
    q = [0.25 * math.exp(0.5 * float(v)) for v in group_loss]
    q = [v / sum(q) for v in q]
    assert objective.q.tolist() == pytest.approx(q)
    expected_loss = sum(a * float(b) for a, b in zip(q, group_loss, strict=True))
    assert float(loss.detach()) == pytest.approx(expected_loss)
    assert torch.equal(logits, model(x))
    # BalancingGroups' form: q all ones, only the batch's groups multiplied, then normalised,
    # and the loss summed over the batch's groups: the same numbers
    reference_q = torch.ones(4)
    present = {0: [0, 1], 1: [2], 3: [3, 4]}
    for g, members in present.items():
        reference_q[g] *= math.exp(0.5 * float(ce[members].mean()))
    reference_q /= reference_q.sum()
    assert objective.q.tolist() == pytest.approx(reference_q.tolist())
    # a second batch moves q on from there, not from uniform
    before = objective.q.clone()
    objective(model, x[:2], y[:2], torch.tensor([3, 3]))  # two samples of group 1
    l1 = float(F.cross_entropy(model(x[:2]), y[:2]).detach())
    expected = before * torch.tensor([1.0, math.exp(0.5 * l1), 1.0, 1.0])
    assert objective.q.tolist() == pytest.approx((expected / expected.sum()).tolist())
    loss.backward()  # the loss is differentiable, q is not
    assert model.weight.grad is not None and not objective.q.requires_grad


def test_groupdro_trains_with_its_objective_and_records_q(ctx):
    data = _planted()
    result, trainer = _run("groupdro", data, ctx, eta=0.2)
    (call,) = trainer.calls
    assert isinstance(call["objective"], GroupDroObjective) and call["objective"].eta == 0.2
    details = result.details
    assert details["eta"] == 0.2 and details["reweight_groups"]
    assert len(details["q_by_epoch"]) == 3 and details["final_q"] == details["q_by_epoch"][-1]
    assert sum(details["final_q"]) == pytest.approx(1.0)
    assert details["q_at_chosen_epoch"] == details["q_by_epoch"][details["chosen"]["epoch"] - 1]
    assert details["sampling"]["by"] == "group" and details["sampling"]["sizes"] == [
        200, 10, 10, 200
    ]  # fmt: skip
    # without reweighting every sample is visited once per epoch
    plain, trainer = _run("groupdro", data, ctx, reweight_groups=False)
    (call,) = trainer.calls
    assert call["indices"] is None and plain.details["sampling"] is None
    assert torch.equal(torch.sort(call["ends"][0].order).values, torch.arange(420))


# -- the behaviour the literature reports --------------------------------------------------------


def test_rwg_and_groupdro_raise_worst_group_accuracy_over_erm(tmp_path):
    """Strong correlation (95 % of training images), a test split that follows it: ERM relies
    on the patch; group-balanced draws (RWG) and GroupDRO lift the worst group (Idrissi et al.
    2022 Table 2, Sagawa et al. 2020)."""
    for seed in range(3):
        data = planted_spurious_dataset(
            [[600, 30], [30, 600]], [[300, 30], [30, 300]], [[60, 60], [60, 60]], seed=seed
        )
        ctx = RunContext(
            seed=seed, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=tmp_path,
            cache_dir=tmp_path,
        )  # fmt: skip
        trainer = SpyTrainer(data, ctx, epochs=5, hidden=(32,))
        wga = {}
        for name, cls in (("erm", ErmMitigator), ("rwg", RwgMitigator), ("dro", GroupDroMitigator)):
            model = cls(cls.Options()).mitigate(None, trainer, data, ctx).model
            scores = split_scores(trainer.predict(model, data.test.images), data.test, 4)
            wga[name] = scores["worst_group_accuracy"]
        assert wga["erm"] < 0.3, (seed, wga)
        assert wga["rwg"] > wga["erm"] + 0.2 and wga["dro"] > wga["erm"] + 0.2, (seed, wga)
