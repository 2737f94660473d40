"""Observation features: a fixed size per host, every feature documented, unknowns and disabled slots 0."""

import re

import torch

from esper.leyline import Action, Blueprint, Decision, Operation
from esper.nissa import Telemetry
from esper.simic import EnvConfig, GrowthEnv
from esper.simic.toy import SimulatedTrainer
from esper.tamiyo import features
from esper.tamiyo.features import FeatureSpec

WITH = FeatureSpec.for_host("synthetic", param_budget=500_000, telemetry=True)
WITHOUT = FeatureSpec.for_host("synthetic", param_budget=500_000, telemetry=False)


def test_dimensions_of_the_cnn_hosts():
    assert (WITH.dim, WITHOUT.dim) == (96, 93)  # the README and the module docstring state these
    assert WITH.names()[:WITHOUT.dim] != WITHOUT.names()  # the gradient feature sits in each slot block
    assert [n for n in WITH.names() if n not in WITHOUT.names()] == [f"{s}.seed_grad_norm" for s in WITH.slots]


def test_every_feature_is_in_the_documented_table():
    doc = features.__doc__
    for name in WITH.names():
        base = name.split(".")[-1]
        base = re.sub(r"_delta_\d$", "_delta_k", base)
        base = re.sub(r"^(recently_culled|blueprint)_\w+$", r"\1_<bp>", base)
        base = re.sub(r"^stage_\w+$", "stage_<stage>", base)
        assert f"| {base}" in doc, f"{name} ({base}) is not in the table of tamiyo/features.py"


def observations(synthetic_data, slots, epochs):
    env = GrowthEnv(EnvConfig(task="synthetic", max_epochs=epochs, slots=slots, seed_grad_norms=True),
                    synthetic_data, torch.device("cpu"), Telemetry("features"), trainer_factory=SimulatedTrainer)
    obs = [env.reset(0)]
    germinate = Action(operation=Operation.OPERATION_GERMINATE, slot=slots[0], blueprint=Blueprint.BLUEPRINT_NORM)
    advance = Action(operation=Operation.OPERATION_ADVANCE, slot=slots[0])
    for action in [germinate, advance] + [Action(operation=Operation.OPERATION_WAIT)] * (epochs - 2):
        obs.append(env.step(Decision(action=action))[0])
    return obs


def test_unknowns_and_disabled_slots_are_zero(synthetic_data):
    obs = observations(synthetic_data, ("mid",), 4)
    names = WITH.names()
    x = dict(zip(names, WITH.encode(obs[0])))
    assert all(x[n] == 0 for n in names if re.match(r"(train_|val_|best_|history_|plateau)", n))  # epoch 0
    assert x["mid.enabled"] == 1 and x["mid.stage_dormant"] == 1 and x["budget_left"] == 1
    for o in obs:
        v = dict(zip(names, WITH.encode(o)))
        assert all(v[n] == 0 for n in names if n.startswith(("early.", "late.")))  # disabled slots
    last = dict(zip(names, WITH.encode(obs[-1])))
    assert last["mid.stage_training"] == 1 and last["mid.blueprint_norm"] == 1
    assert last["mid.has_contribution"] == 1 and last["mid.seed_grad_norm"] > 0
    assert last["history_known"] == 0.6 and last["val_acc_delta_3"] != 0 and last["val_acc_delta_4"] == 0


def test_encode_batch_shape(synthetic_data):
    obs = observations(synthetic_data, ("early", "late"), 3)
    batch = WITHOUT.encode_batch(obs)
    assert batch.shape == (4, 93) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    assert FeatureSpec.from_dict(WITHOUT.to_dict()) == WITHOUT


def test_an_emptied_slot_names_no_blueprint(synthetic_data):
    """A culled seed leaves its slot empty: the slot's blueprint one-hot goes to 0 with it (the culled
    blueprint is in recently_culled_<bp>), as it is before any seed."""
    env = GrowthEnv(EnvConfig(task="synthetic", max_epochs=4, slots=("mid",)), synthetic_data, torch.device("cpu"),
                    Telemetry("features"), trainer_factory=SimulatedTrainer)
    env.reset(0)
    env.step(Decision(action=Action(operation=Operation.OPERATION_GERMINATE, slot="mid",
                                    blueprint=Blueprint.BLUEPRINT_NORM)))
    after_cull, _ = env.step(Decision(action=Action(operation=Operation.OPERATION_CULL, slot="mid")))
    x = dict(zip(WITHOUT.names(), WITHOUT.encode(after_cull)))
    assert x["mid.stage_embargoed"] == 1 and x["mid.seed_params"] == 0
    assert [n for n, v in x.items() if n.startswith("mid.blueprint_") and v] == []
    assert x["recently_culled_norm"] > 0
