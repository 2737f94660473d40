"""GrowthEnv: one growing training run as an environment. One step = one operation + one epoch.

    obs = env.reset(seed)
    while not done:
        obs, done = env.step(policy.decide(obs))

The heuristic, the static baseline and PPO (simic.actor) all drive this same step; there is no second code
path. Illegal operations raise before anything changes; `legal_actions()` lists what is allowed.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from esper.kasmina import LifecycleConfig, MorphogeneticModel, build_host
from esper.leyline import (
    Action,
    Blueprint,
    Decision,
    EpochReport,
    GovernorEvent,
    LifecycleTransition,
    Observation,
    SeedStage,
    TelemetryLevel,
    TrainingSignals,
    from_short_name,
)
from esper.nissa import Telemetry
from esper.nissa.diagnostics import GradientMonitor, top_hessian_eigenvalue
from esper.simic.checkpoint import rng_state, set_rng_state
from esper.tamiyo import Policy
from esper.tolaria.data import Dataset
from esper.tolaria.governor import Governor, GovernorConfig
from esper.tolaria.grouped import MAX_GROUP, GroupMember, TrainerGroup
from esper.tolaria.trainer import EvalResult, TrainConfig, Trainer

# Epochs of accuracy/loss history in an observation: enough for the heuristic to compare a seed's whole
# blend (up to max_stage_epochs, 12) with the regression_window (3) before it; 10 had hidden a drop
# from the 10th blending epoch on.
HISTORY = 16


@dataclass(frozen=True)
class EnvConfig:
    task: str = "cifar10"
    """Host and data: cifar10 | cifar10_deep | synthetic | tinystories."""
    max_epochs: int = 75
    """Epochs (= environment steps) per episode."""
    slots: tuple[str, ...] = ("mid",)
    """Enabled slots (early | mid | late)."""
    max_seeds: int = 0
    """Seeds that may germinate per episode; 0 = unlimited."""
    grafts: tuple[tuple[str, str], ...] = ()
    """(slot, blueprint) seeds built in as host structure before epoch 1 (the from-scratch arm)."""
    seed_grad_norms: bool = False
    """Measure each live seed's gradient norm every epoch whatever the telemetry level (the PPO
    policy's gradient-health features); without it they are measured at DEBUG level only."""
    sharpness_every: int = 5
    """At DEBUG telemetry, measure the top eigenvalue of the loss Hessian in the host's parameters (fossilized
    seeds included; EpochReport.sharpness) every this many epochs: 20 double-backward passes on one batch,
    about an epoch of 20 batches; 0 = never."""
    train: TrainConfig = field(default_factory=TrainConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)


class GrowthEnv:
    def __init__(self, cfg: EnvConfig, data: Dataset, device: torch.device, telemetry: Telemetry,
                 trainer_factory=Trainer):
        """`trainer_factory` builds the training loop from (model, data, train config, device, generator):
        tolaria's Trainer, or simic.toy's simulated one for fast learning tests of the controller."""
        self.cfg = cfg
        self.data = data
        self.device = device
        self.telemetry = telemetry
        self.trainer_factory = trainer_factory

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int) -> Observation:
        cfg = self.cfg
        self.rng = torch.Generator().manual_seed(seed).get_state()

        grafted = []

        def graft(model: MorphogeneticModel) -> None:
            grafted.extend(model.graft(slot, from_short_name(Blueprint, blueprint)) for slot, blueprint in cfg.grafts)

        with self.own_rng():
            self._build(seed, graft)
        self.governor.snapshot(self.model, 0)
        self.epoch = 0
        self.train_loss = self.train_accuracy = 0.0
        self.val = EvalResult(loss=0.0, accuracy=0.0, contributions={})
        self.best_val_accuracy = 0.0
        self.plateau_epochs = 0
        self.val_accuracy_history: list[float] = []
        self.val_loss_history: list[float] = []
        self.recently_culled: list[int] = []
        self.grad_norms: dict[str, float] = {}
        self._record(grafted)  # at epoch 0, before the first decision
        return self.observation()

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """Torch's global CPU generator as this episode last left it, for the draws the episode makes (the
        host's initialization, each seed's): an episode's numbers depend on its seed and its decisions
        only, never on what other environments drew between its steps, so environments may step in any
        order, or in processes of their own (simic.env_process), and give the same episodes."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            yield
            self.rng = torch.get_rng_state()

    def _build(self, seed: int, shape) -> None:
        """A fresh model (`shape(model)` adds seeds before it moves to the device and the host optimizer
        takes its parameters), its trainer with the data-order generator, a governor."""
        cfg = self.cfg
        self.model = MorphogeneticModel(build_host(cfg.task), cfg.slots, cfg.lifecycle, cfg.max_seeds)
        shape(self.model)
        self.model.to(self.device)
        generator = torch.Generator(device=self.data.train_x.device).manual_seed(seed)
        self.trainer = self.trainer_factory(self.model, self.data, cfg.train, self.device, generator)
        self.governor = Governor(cfg.governor)

    # ------------------------------------------------------------------ checkpoints
    SIGNALS = ("epoch", "train_loss", "train_accuracy", "best_val_accuracy", "plateau_epochs",
               "val_accuracy_history", "val_loss_history", "recently_culled", "grad_norms")

    def state_dict(self) -> dict:
        """The whole episode at an epoch boundary, as tensors and plain values (torch.load weights_only):
        model weights with the slots' lifecycle and seed records, optimizers, data-order generator, the
        governor's last good state, the signal history, every global RNG, and the run id and telemetry
        sequence, so a resumed run numbers its events on from where this one stopped."""
        return {
            "run_id": self.telemetry.run_id, "sequence": self.telemetry.sequence,
            "lifecycle": self.model.lifecycle_state(), "model": self.model.state_dict(),
            "trainer": self.trainer.state_dict(), "governor": self.governor.state_dict(),
            "signals": {name: getattr(self, name) for name in self.SIGNALS} | {"val": dataclasses.asdict(self.val)},
            "rng": rng_state() | {"torch": self.rng},
        }

    def resume(self, state: dict) -> Observation:
        """Continue from `state_dict()` (another process's, possibly): the next `step` trains the epoch the
        saved run would have trained next, with the same numbers. The telemetry must carry the saved run id."""
        if state["run_id"] != self.telemetry.run_id:
            raise ValueError(f"the state is run {state['run_id']}, the telemetry run {self.telemetry.run_id}")
        with torch.random.fork_rng(devices=[]):  # initial weights, replaced by the saved ones below
            self._build(0, lambda model: model.restore_lifecycle(state["lifecycle"]))
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])
        self.governor.load_state_dict(state["governor"])
        signals = dict(state["signals"])
        self.val = EvalResult(**signals.pop("val"))
        for name, value in signals.items():
            setattr(self, name, value)
        self.telemetry.sequence = state["sequence"]
        set_rng_state(state["rng"])
        self.rng = state["rng"]["torch"]
        return self.observation()

    def legal_actions(self) -> list[Action]:
        return self.model.legal_actions()

    def step(self, decision: Decision) -> tuple[Observation, bool]:
        self.begin_step(decision)
        return self.end_step()

    def begin_step(self, decision: Decision) -> None:
        """The first half of `step`: the operation, and the alphas of the epoch it trains. Between the two
        halves the trainer's epoch may be trained by a group of runs (tolaria.grouped, `step_together`)."""
        with self.own_rng():
            model, tel = self.model, self.telemetry
            model.check_legal(decision.action)
            epoch = self.epoch + 1  # the epoch this step trains, 1-based
            if tel.wants(TelemetryLevel.TELEMETRY_LEVEL_NORMAL):  # with what it was made on: a late joiner replays it
                recorded = Decision()
                recorded.CopyFrom(decision)
                recorded.observation.CopyFrom(self.observation())
                tel.emit(decision=recorded)
            outcome = model.execute(decision.action, epoch, decision.reason)
            for check in outcome.gates:
                tel.emit(gate=check)
            self._record(outcome.transitions)
            self.epoch_stages = {name: slot.stage for name, slot in model.slots.items()}
            """Slot -> the stage it spends this epoch in: a cull's epoch is CULLED, although the end of the
            epoch moves the slot on to EMBARGOED (what a lifecycle timeline draws)."""

            self.step_started = time.perf_counter()
            model.begin_epoch()
            debug = tel.wants(TelemetryLevel.TELEMETRY_LEVEL_DEBUG)
            self.monitor = GradientMonitor(gradient_groups(model)) if debug else None
            self.trainer.after_backward = self.monitor.accumulate if self.monitor else None

    def end_step(self) -> tuple[Observation, bool]:
        """The second half of `step`: the epoch's training, the governor, evaluation and the epoch's report."""
        with self.own_rng():
            model, tel, monitor = self.model, self.telemetry, self.monitor
            epoch = self.epoch + 1
            train_loss, train_accuracy = self.trainer.train_epoch()
            if self.cfg.seed_grad_norms or tel.wants(TelemetryLevel.TELEMETRY_LEVEL_DEBUG):
                self.grad_norms = self.trainer.seed_grad_norms()
            sharpness = 0.0
            if (tel.wants(TelemetryLevel.TELEMETRY_LEVEL_DEBUG) and self.cfg.sharpness_every
                    and epoch % self.cfg.sharpness_every == 0):
                # In what the host optimizer trains: the loss does not depend on a TRAINING seed, and the
                # straight-through gradient it gets is no derivative of the loss to differentiate again.
                sharpness = top_hessian_eigenvalue(self.trainer.fixed_batch_loss, model.host_parameters())
            cause = self.governor.verdict(train_loss)
            if cause:  # the observation keeps the restored epoch's training loss: a policy never sees a NaN
                culled = model.cull_live(epoch, f"governor: {cause}")
                restored = self.governor.restore(model)
                self.trainer.reset_momentum()
                tel.emit(governor=GovernorEvent(epoch=epoch, cause=cause, train_loss=train_loss,
                                                restored_epoch=restored, culled_slots=[t.slot for t in culled]))
                self._record(culled)
            else:
                self.train_loss, self.train_accuracy = train_loss, train_accuracy
            self.val = self.trainer.evaluate("val")
            for name, contribution in self.val.contributions.items():
                model.slots[name].contribution = contribution
                model.slots[name].loss_contribution = self.val.loss_contributions[name]
            self._record(model.end_epoch(epoch))
            if cause is None:
                self.governor.snapshot(model, epoch)
            self.epoch = epoch
            self._update_signals()

            obs = self.observation()
            tel.emit(epoch=EpochReport(signals=obs.signals, slots=obs.slots, trained_stages=self.epoch_stages,
                                       epoch_seconds=time.perf_counter() - self.step_started, sharpness=sharpness,
                                       gradients=monitor.read() if monitor else []))
            return obs, self.epoch >= self.cfg.max_epochs

    def seed_fates(self) -> dict[str, int]:
        """How many of the episode's seeds met each fate so far (fossilized, culled, blending, ...)."""
        return dict(Counter(record.fate for record in self.model.records))

    def evaluate_test(self) -> EvalResult:
        """Only for final reports: the test set never informs a decision."""
        return self.trainer.evaluate("test", counterfactual=False)

    # ------------------------------------------------------------------ views
    def observation(self) -> Observation:
        model = self.model
        signals = TrainingSignals(
            epoch=self.epoch, max_epochs=self.cfg.max_epochs,
            train_loss=self.train_loss, train_accuracy=self.train_accuracy,
            val_loss=self.val.loss, val_accuracy=self.val.accuracy,
            best_val_accuracy=self.best_val_accuracy, plateau_epochs=self.plateau_epochs,
            host_params=model.host_param_count, total_params=model.total_param_count,
            val_accuracy_history=self.val_accuracy_history[-HISTORY:],
            val_loss_history=self.val_loss_history[-HISTORY:],
        )
        slots = model.slot_states()
        for state in slots:
            state.seed_grad_norm = self.grad_norms.get(state.slot, 0.0)
        return Observation(
            run_id=self.telemetry.run_id, signals=signals, slots=slots, blueprints=model.blueprints,
            seeds_germinated=model.seeds_germinated, max_seeds=model.max_seeds,
            recently_culled=self.recently_culled[-5:],
        )

    # ------------------------------------------------------------------ internals
    def _record(self, transitions: list[LifecycleTransition]) -> None:
        for t in transitions:
            self.telemetry.emit(transition=t)
            if t.to_stage == SeedStage.SEED_STAGE_CULLED:
                self.recently_culled.append(t.blueprint)

    def _update_signals(self) -> None:
        acc = self.val.accuracy
        if acc > self.best_val_accuracy:
            self.best_val_accuracy, self.plateau_epochs = acc, 0
        else:
            self.plateau_epochs += 1
        self.val_accuracy_history.append(acc)
        self.val_loss_history.append(self.val.loss)


def gradient_groups(model: MorphogeneticModel) -> dict[str, list[torch.nn.Parameter]]:
    """The units gradient health reports: the host's stem, each block and the head, and each slot's seed
    (live or fossilized). Blocks, not single convolutions or norms: one row per block is what a reader
    can scan while a run trains, and a block is what a slot sits between."""
    host = model.host
    groups = {"stem": list(host.stem.parameters()),
              **{f"block{i}": list(block.parameters()) for i, block in enumerate(host.blocks)},
              "head": list(host.head.parameters())}
    groups |= {f"seed:{name}": list(slot.seed.parameters()) for name, slot in model.slots.items()
               if slot.seed is not None}
    return {name: params for name, params in groups.items() if params}


def run_episode(env: GrowthEnv, policy: Policy, seed: int, on_epoch=None, start: Observation | None = None
                ) -> Observation:
    """Drive one episode with `policy`; `on_epoch(obs)` after every step (progress bars, checkpoints).
    With `start`, the observation of `env` already reset or resumed (GrowthEnv.resume), the episode steps on
    from it instead of starting at `seed`."""
    obs = env.reset(seed) if start is None else start
    done = env.epoch >= env.cfg.max_epochs
    while not done:
        obs, done = env.step(policy.decide(obs))
        if on_epoch is not None:
            on_epoch(obs)
    return obs


def step_together(envs: list[GrowthEnv], decisions: list[Decision]) -> list[tuple[Observation, bool]]:
    """Each environment's `step` (their trainers GroupMembers), their epochs trained together: every
    operation first, then the TrainerGroups' epochs, then every environment's evaluation and report. A
    device's environments are one group, or past MAX_GROUP the fewest groups of up to MAX_GROUP, as even as
    can be and in their order (9: 4 and 5, never 8 and an eager group of one, which is no faster than a plain
    run). The environments may be at different epochs (a resumed experiment's)."""
    for env, decision in zip(envs, decisions, strict=True):
        env.begin_step(decision)
    by_device: dict[torch.device, list[GroupMember]] = {}
    for env in envs:
        by_device.setdefault(env.device, []).append(env.trainer)
    for members in by_device.values():
        n, groups = len(members), -(-len(members) // MAX_GROUP)
        for g in range(groups):
            TrainerGroup(members[g * n // groups:(g + 1) * n // groups]).train_epoch()
    return [env.end_step() for env in envs]


def fates_in_words(fates: Mapping[str, int]) -> str:
    """Seeds' fates (GrowthEnv.seed_fates, or their sum over runs) as a reader wants them: '3 fossilized, 2
    culled', most first, or 'none germinated'."""
    return ", ".join(f"{n} {fate}" for fate, n in Counter(fates).most_common() if n) or "none germinated"
