"""The PPO training loop: n_envs growth environments stepped in lockstep, in this process (their epochs
one after another, or trained together: `grouped`) or each in a process of its own (`env_processes`),
with the policy here.

Episodes run in *rounds*: each of n_envs environments starts an episode (episode i uses seed + i) and
all of them step together, one epoch each, with one batched policy forward for all of them. After
`update_every` rounds the rollout holds n_envs x update_every whole episodes and PPO updates the policy
on it (the original tool documented "update every 5 episodes" and ignored the flag). Episodes are never
cut: each one's last epoch is a termination (see ppo.compute_gae for why the time limit is not a
truncation here).

After every round the state (policy, optimizer, normalizers, RNG states, counters and the rollout of the
rounds not yet learned from) fits in a checkpoint of plain tensors, and resuming from it continues bit
for bit on CPU.

The loop knows nothing about run directories or files: it takes telemetry objects and reports each
round to a callback; esper.train_ppo wires it to the command line.
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esper.leyline import Decision, Observation, Operation, PPOUpdate, RunFinished, RunStarted, short_name
from esper.nissa import Telemetry
from esper.simic.actor import Act, EnvFactory, make_envs, play_round
from esper.simic.checkpoint import ResumeError, build_network, changed_settings, contents_checked
from esper.simic.env import EnvConfig, GrowthEnv
from esper.simic.env_process import EnvProcess
from esper.simic.ppo import PPOConfig, RewardNormalizer, UpdateStats, ent_coef_at, lr_at, ppo_update
from esper.simic.rewards import COMPONENTS, Rewarder, RewardConfig
from esper.simic.rollout import Rollout
from esper.tamiyo.features import FeatureSpec, RunningMeanStd
from esper.tamiyo.network import OPERATIONS, ActionCodec, ActorCritic, NeuralPolicy, decision
from esper.tolaria.data import Dataset


@dataclass(frozen=True)
class TrainerConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    episodes: int = 100
    """Episodes in all (--episodes); the last round runs fewer environments if n_envs does not divide it."""
    n_envs: int = 4
    """Environments stepped in lockstep, one batched policy forward per epoch (--n-envs)."""
    update_every: int = 5
    """Episodes per environment between PPO updates (--update-every): each update learns from
    n_envs x update_every whole episodes."""
    seed: int = 42
    """Policy initialization, action sampling, minibatch order; episode i's environment uses seed + i."""
    device: str = "cpu"
    """Where the policy runs and learns (--device)."""
    devices: tuple[str, ...] = ()
    """Where the environments train, round robin (--devices); empty: `device`."""
    telemetry_features: bool = True
    """Observe seed gradient norms (off: --no-telemetry)."""

    def __post_init__(self) -> None:
        for name, value in (("--episodes", self.episodes), ("--n-envs", self.n_envs),
                            ("--update-every", self.update_every)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def env_devices(self) -> tuple[str, ...]:
        return self.devices or (self.device,)

    @property
    def env_config(self) -> EnvConfig:
        """The environments' config: they measure seed gradient norms when the policy observes them."""
        return dataclasses.replace(self.env, seed_grad_norms=self.telemetry_features)

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec.for_host(self.env.task, self.reward.param_budget, self.telemetry_features)


def play_episodes(cfg: TrainerConfig, data: dict[str, Dataset], episodes: range,
                  env_telemetry: Callable[[int], Telemetry], codec: ActionCodec, act: Act,
                  env_factory: EnvFactory = GrowthEnv, processes: list[EnvProcess] = (),
                  grouped: bool = False) -> tuple[Rollout, list, list[Observation]]:
    """One round: episode e of `episodes` in an environment of its own (make_envs), reset with seed + e,
    all stepped together under `act`. The rollout with raw rewards, the environments, their final
    observations. The trainer (in-process PPO) and a stack's tolaria_worker (PPO over the wire) both play
    rounds with it, so their environments are alike."""
    envs = make_envs(cfg.env_config, data, cfg.env_devices, env_telemetry, episodes, env_factory, processes, grouped)
    rewarders = [Rewarder(cfg.reward, cfg.ppo.gamma) for _ in envs]
    started = time.perf_counter()
    for i, (env, e) in enumerate(zip(envs, episodes)):  # each episode is a run of its own in karn's views
        env.telemetry.emit(run_started=RunStarted(mode="ppo", task=cfg.env.task, seed=cfg.seed + e,
                                                  device=cfg.env_devices[i % len(cfg.env_devices)]))
    rollout, obs = play_round(envs, [cfg.seed + e for e in episodes], rewarders, codec, act, cfg.env.max_epochs)
    for env, o in zip(envs, obs):  # no test accuracy: a training episode is never tested
        env.telemetry.emit(run_finished=RunFinished(val_accuracy=o.signals.val_accuracy, epochs=o.signals.epoch,
                                                    total_params=o.signals.total_params,
                                                    wall_seconds=time.perf_counter() - started))
    return rollout, envs, obs


# Fields a resumed run may change: how long it runs, where and how fast (cuDNN's choice of algorithms and CUDA
# graphs' kernels, which a device change changes too); everything else must match the checkpoint.
RESUMABLE_CHANGES = ("episodes", "device", "devices", "env.train.cudnn_benchmark", "env.train.cuda_graph")


class PPOTrainer:
    def __init__(self, cfg: TrainerConfig, data: dict[str, Dataset], telemetry: Telemetry,
                 env_telemetry: Callable[[int], Telemetry], env_factory: EnvFactory = GrowthEnv):
        """data: the dataset per environment device; telemetry: the learner's (PPO updates);
        env_telemetry(episode): each episode's own (decisions, epochs, gates, transitions)."""
        self.cfg = cfg
        self.data = data
        self.telemetry = telemetry
        self.env_telemetry = env_telemetry
        self.env_factory = env_factory
        self.device = torch.device(cfg.device)
        self.env_cfg = cfg.env_config
        self.spec = cfg.feature_spec
        self.codec = ActionCodec(self.spec)
        torch.manual_seed(cfg.seed)
        self.agent = ActorCritic(self.spec.dim, len(self.spec.slots), len(self.spec.blueprints),
                                 cfg.ppo.hidden_size).to(self.device)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=cfg.ppo.lr, eps=1e-5)
        self.obs_rms = RunningMeanStd((self.spec.dim,))
        self.reward_norm = RewardNormalizer(cfg.ppo.gamma, cfg.ppo.clip_reward)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.episodes_done = self.updates = self.global_step = 0
        self.pending: Rollout | None = None  # transitions of the rounds since the last update
        self.pending_rounds = 0
        self.collect_seconds = 0.0
        self.episode_log: list[dict] = []
        self.update_log: list[dict] = []
        self.trained_seeds: set[int] = set()
        """The seeds of the episodes the policy has learned from (an update's rollout, from here or from
        workers): a comparison measures it on others only (cli.check_held_out). -1: not recorded."""
        self.env_processes: list[EnvProcess] = []
        """Set by the caller to play rounds in these (simic.env_process, --env-processes) instead of in
        environments of this process; at least n_envs of them, on the devices make_envs would use."""
        self.grouped = False
        """Set by the caller to train the environments' epochs together, each device's (up to 8 at a time) as
        the groups of one network (tolaria.grouped, simic.step_together, --grouped)."""

    # ------------------------------------------------------------------ acting
    def observe(self, observations: list) -> torch.Tensor:
        """Features of a batch of observations, normalized (updating the running stats when enabled)."""
        raw = self.spec.encode_batch(observations)  # [N, dim]
        if self.cfg.ppo.norm_obs:
            self.obs_rms.update(raw)
        return self.obs_rms.normalize(raw, self.cfg.ppo.clip_obs).to(self.device)

    def act(self, observations: list[Observation],
            legal: torch.Tensor) -> tuple[list[Decision], dict[str, torch.Tensor]]:
        """The acting policy for play_round: normalize, one batched forward, sample with the trainer's generator."""
        x = self.observe(observations)
        with torch.no_grad():
            action, logprob, _, value, probs = self.agent.get_action_and_value(x, legal.to(self.device),
                                                                               generator=self.generator)
        decisions = [decision(self.codec, a, p, v, "ppo", str(self.updates), lp)
                     for a, p, v, lp in zip(action.tolist(), probs.tolist(), value.tolist(), logprob.tolist())]
        return decisions, {"obs": x, "actions": action, "logprobs": logprob, "values": value,
                           "policy_version": torch.full((len(observations),), self.updates, device=self.device)}

    def policy(self, greedy: bool = True, seed: int = 0) -> NeuralPolicy:
        """The current policy as a tamiyo Policy, for evaluation (shares the network)."""
        return NeuralPolicy(self.agent, self.spec, self.obs_rms, self.cfg.ppo.clip_obs, str(self.updates),
                            greedy=greedy, seed=seed)

    # ------------------------------------------------------------------ training
    def train(self, on_round: Callable[[PPOTrainer, list[dict]], None] | None = None) -> None:
        """Rounds until cfg.episodes episodes are done, updating every update_every rounds (and after the
        last); on_round(trainer, episode results) after each round (the caller checkpoints there)."""
        while self.episodes_done < self.cfg.episodes:
            rollout, results = self.run_round()
            self.pending = rollout if self.pending is None else Rollout.cat([self.pending, rollout])
            self.pending_rounds += 1
            if self.pending_rounds == self.cfg.update_every or self.episodes_done == self.cfg.episodes:
                self.update()
            if on_round is not None:
                on_round(self, results)

    def run_round(self) -> tuple[Rollout, list[dict]]:
        """One episode in each of up to n_envs environments: their transitions [max_epochs, n] and results."""
        cfg = self.cfg
        started = time.perf_counter()
        n = min(cfg.n_envs, cfg.episodes - self.episodes_done)
        episodes = range(self.episodes_done, self.episodes_done + n)
        rollout, envs, obs = play_episodes(cfg, self.data, episodes, self.env_telemetry, self.codec, self.act,
                                           self.env_factory, self.env_processes, self.grouped)
        if cfg.ppo.norm_reward:
            rollout.rewards = self.reward_norm.episodes(rollout.rewards)
        self.global_step += rollout.num_steps
        self.episodes_done += n
        self.collect_seconds += time.perf_counter() - started
        results = [self._episode_result(e, env, o, rollout, column)
                   for column, (e, env, o) in enumerate(zip(episodes, envs, obs))]
        self.episode_log += results
        return rollout, results

    def update(self) -> UpdateStats:
        """PPO on the pending rollout; publishes the stats (telemetry and update_log)."""
        rollout = self.pending
        ent_coef = ent_coef_at(self.cfg.ppo, self.episodes_done, self.cfg.episodes)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg.ppo, self.episodes_done - rollout.rewards.shape[1], self.cfg.episodes)
        stats = ppo_update(self.agent, self.optimizer, rollout, self.cfg.ppo, ent_coef, self.generator)
        self.trained_seeds.update(rollout.seeds[0].tolist())
        self.updates += 1
        stats.reward_components = dict(zip(COMPONENTS, rollout.reward_parts.sum((0, 1)).tolist()))
        stats.steps_per_second = rollout.num_steps / self.collect_seconds
        self.pending, self.pending_rounds, self.collect_seconds = None, 0, 0.0
        self.update_log.append({"update": self.updates, "global_step": self.global_step,
                                "episodes": self.episodes_done, **dataclasses.asdict(stats)})
        self.telemetry.emit(ppo_update=PPOUpdate(
            update=self.updates, global_step=self.global_step, episodes=self.episodes_done,
            policy_loss=stats.policy_loss, value_loss=stats.value_loss, entropy=stats.entropy,
            approx_kl=stats.approx_kl, clipfrac=stats.clipfrac, explained_variance=stats.explained_variance,
            grad_norm=stats.grad_norm, epochs_run=stats.epochs_run,
            early_stopped=stats.early_stop_epoch is not None, minibatch_steps=stats.minibatch_steps,
            nonfinite_skipped=stats.nonfinite_skipped,
            ent_coef=stats.ent_coef, learning_rate=stats.lr, action_counts=stats.action_counts,
            reward_components=stats.reward_components, steps_per_second=stats.steps_per_second,
            rollout_steps=rollout.num_steps,
        ))
        return stats

    def _episode_result(self, episode: int, env: GrowthEnv | EnvProcess, obs, rollout: Rollout, column: int) -> dict:
        ops = torch.bincount(rollout.actions[:, column, 0].cpu(), minlength=len(OPERATIONS)).tolist()
        return {
            "episode": episode, "seed": self.cfg.seed + episode,
            "return": float(rollout.reward_parts[:, column].sum()),
            "val_accuracy": obs.signals.val_accuracy, "total_params": obs.signals.total_params,
            "seed_fates": env.seed_fates(),
            "actions": {short_name(Operation, op): n for op, n in zip(OPERATIONS, ops)},
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything a resumed run needs, as tensors and plain values (torch.load weights_only)."""
        return {
            "config_json": json.dumps(dataclasses.asdict(self.cfg)),
            "feature_spec": self.spec.to_dict(),
            "hidden_size": self.cfg.ppo.hidden_size,
            "clip_obs": self.cfg.ppo.clip_obs,
            "network": self.agent.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "obs_rms": self.obs_rms.state(),
            "reward_rms": self.reward_norm.rms.state(),
            "rng": {"policy": self.generator.get_state(), "torch": torch.get_rng_state()},
            "counters": {"episodes": self.episodes_done, "updates": self.updates, "global_step": self.global_step,
                         "pending_rounds": self.pending_rounds, "collect_seconds": self.collect_seconds},
            "pending": None if self.pending is None else {k: v.cpu() for k, v in self.pending.tensors().items()},
            "episode_log_json": json.dumps(self.episode_log),
            "update_log_json": json.dumps(self.update_log),
            "trained_seeds": sorted(self.trained_seeds),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint written by a run with the same config (but RESUMABLE_CHANGES)."""
        check_resumable(self.cfg, state)
        network, _ = build_network(state)
        self.agent.load_state_dict(network.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.obs_rms.load(state["obs_rms"])
        self.reward_norm.rms.load(state["reward_rms"])
        self.generator.set_state(state["rng"]["policy"])
        torch.set_rng_state(state["rng"]["torch"])
        counters = state["counters"]
        self.episodes_done, self.updates, self.global_step = (
            counters["episodes"], counters["updates"], counters["global_step"])
        self.pending_rounds, self.collect_seconds = counters["pending_rounds"], counters["collect_seconds"]
        pending = state["pending"]
        if pending is not None and "seeds" not in pending and "inbox_json" not in state:
            # `esper train ppo` from before rollouts carried seeds: its pending episodes are the last ones played
            steps, n = pending["terminated"].shape
            first = self.cfg.seed + self.episodes_done - n
            pending = pending | {"seeds": torch.arange(first, first + n).expand(steps, n)}
        self.pending = (None if pending is None
                        else Rollout.from_tensors({k: v.to(self.device) for k, v in pending.items()}))
        self.episode_log = json.loads(state["episode_log_json"])
        self.update_log = json.loads(state["update_log_json"])
        self.trained_seeds = trained_seeds(state)


def trained_seeds(state: dict) -> set[int]:
    """The seeds of the episodes a checkpoint's policy learned from. A checkpoint from before they were
    recorded: for `esper train ppo` its episode i was seed + i (those still pending left out); for a
    simic_learner, whose workers choose their own seeds, unknown ({-1})."""
    if "trained_seeds" in state:
        if not (isinstance(seeds := state["trained_seeds"], list) and all(type(s) is int for s in seeds)):
            raise ValueError(f"trained_seeds {reprlib.repr(seeds)} is no list of seeds")
        return set(seeds)
    if "inbox_json" in state:
        return {-1}
    pending = 0 if state["pending"] is None else state["pending"]["terminated"].shape[1]
    start = json.loads(state["config_json"])["seed"]
    return set(range(start, start + state["counters"]["episodes"] - pending))


def check_loadable(cfg: TrainerConfig, state: dict, path: Path | str) -> None:
    """ResumeError unless a PPOTrainer of `cfg` continues `state`, the checkpoint at `path`: its settings
    (check_resumable), then every part of it loaded into a trainer made for the purpose, so that a checkpoint
    made or damaged by hand is refused before a run directory is made, not as the run starts."""
    with contents_checked(path), torch.random.fork_rng(devices=[]):  # the trial leaves no RNG drawn or set
        trial = Telemetry("check")  # no sinks: it emits nothing
        PPOTrainer(cfg, data={}, telemetry=trial, env_telemetry=lambda episode: trial).load_state_dict(state)
        if not all(type(state["counters"][k]) is int for k in ("episodes", "updates", "global_step")):
            raise TypeError(f"counters {reprlib.repr(state['counters'])} are no counts")
        trained_seeds(state)


def check_resumable(cfg: TrainerConfig, state: dict) -> None:
    """Raise ResumeError unless `state` was trained with `cfg` but for RESUMABLE_CHANGES."""
    if differ := changed_settings(cfg, json.loads(state["config_json"]), RESUMABLE_CHANGES):
        raise ResumeError(f"the checkpoint was trained with other settings: {', '.join(differ)} differ")
