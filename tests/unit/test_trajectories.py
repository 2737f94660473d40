"""Distributed PPO without sockets: the learner's ack/dedup protocol, the tensor framing, and the whole
actor -> learner -> weights -> policy loop on the toy task (the services only add sockets to this)."""

import functools
import json
import os

import msgpack
import pytest
import torch

from esper.leyline import AckStatus, TrajectoryHeader
from esper.nissa import Telemetry
from esper.simic.actor import make_envs, play_round, remote_act
from esper.simic.checkpoint import load_policy, policy_from_state, save_checkpoint
from esper.simic.env import EnvConfig, GrowthEnv
from esper.simic.learner import Learner
from esper.simic.rewards import RewardConfig, Rewarder, recorded_with
from esper.simic.rollout import Rollout
from esper.simic.toy import SimulatedTrainer
from esper.simic.trainer import TrainerConfig
from esper.transport.limits import MAX_REWARDS_JSON_CHARS, MAX_WORKER_ID_CHARS
from esper.transport.tensors import pack, unpack
from esper.transport.trajectories import (SPOOL_HEAD, Spool, SpoolBusy, SpoolCorrupt, TrajectoryInbox, decode_weights,
                                         weights_frames)

TOY = EnvConfig(task="synthetic", max_epochs=4, slots=("mid",))
make_env = functools.partial(GrowthEnv, trainer_factory=SimulatedTrainer)


def tiny_rollout() -> Rollout:
    return Rollout(**{name: torch.zeros((2, 1), dtype=dtype) for name, dtype in Rollout.DTYPES.items()})


def frames(worker: str, incarnation: int, sequence: int, payload: bytes | None = None,
           task: str = "synthetic", rewards_json: str = "") -> list[bytes]:
    header = TrajectoryHeader(worker_id=worker, incarnation=incarnation, sequence=sequence, n_steps=2, n_envs=1,
                              task=task, rewards_json=rewards_json)
    return [header.SerializeToString(), payload if payload is not None else pack(tiny_rollout().tensors())]


def test_a_trajectory_played_on_another_task_is_refused():
    """synthetic, cifar10 and cifar10_deep observations have the same features: only the header's task tells
    a worker started with another --task than its learner's, whose rollouts had been learned from."""
    applied = []
    inbox = TrajectoryInbox(lambda rollout: applied.append(rollout), version=lambda: 0, task="cifar10")
    refused = inbox.handle(frames("w", 1, 0, task="synthetic"))
    assert refused.status == AckStatus.ACK_STATUS_REJECTED and not applied and inbox.rejected == 1
    assert refused.reason == "played on task 'synthetic'; this learner learns 'cifar10'"
    assert inbox.handle(frames("w", 1, 1, task="cifar10")).status == AckStatus.ACK_STATUS_ACCEPTED and applied


def test_a_trajectory_whose_rewards_were_recorded_with_other_settings_is_refused():
    """A worker records raw rewards with its own RewardConfig and discount (the shaping term's); a learner given
    other reward flags or --gamma had learned from them. One from a worker older than the header's rewards_json
    is taken as it is."""
    applied = []
    ours = recorded_with(RewardConfig(), 0.99)
    inbox = TrajectoryInbox(lambda rollout: applied.append(rollout), version=lambda: 0, rewards=ours)
    sparse = json.dumps(ours | {"mode": "sparse"})
    refused = inbox.handle(frames("w", 1, 0, rewards_json=sparse))
    assert refused.status == AckStatus.ACK_STATUS_REJECTED and not applied
    assert refused.reason == "rewards recorded with other settings: mode 'sparse' (this learner's: 'shaped')"
    shaped_otherwise = inbox.handle(frames("w", 1, 4, rewards_json=json.dumps(ours | {"gamma": 0.5})))
    assert shaped_otherwise.reason == "rewards recorded with other settings: gamma 0.5 (this learner's: 0.99)"
    assert inbox.handle(frames("w", 1, 1, rewards_json="[1]")).reason == \
        "malformed message: rewards_json is not a JSON object"
    # Hostile ones are refused, not raised: nested past the parser's depth (a RecursionError had ended the
    # learner), or too long to keep the reason of in every checkpoint.
    assert inbox.handle(frames("w", 1, 5, rewards_json="[" * 3000)).reason == \
        "malformed message: rewards_json is not a JSON object"
    assert inbox.handle(frames("w", 1, 6, rewards_json=json.dumps({"k" * 5000: 1}))).reason == \
        "malformed message: a rewards_json of 5007 characters (at most 4096)"
    assert inbox.handle(frames("w", 1, 2, rewards_json=json.dumps(ours))).status == AckStatus.ACK_STATUS_ACCEPTED
    assert inbox.handle(frames("w", 1, 3)).status == AckStatus.ACK_STATUS_ACCEPTED and len(applied) == 2


def test_the_header_limits_hold_at_their_boundaries_and_a_message_is_two_frames():
    """A worker_id of MAX_WORKER_ID_CHARS (a 255-character hostname) and a rewards_json of MAX_REWARDS_JSON_CHARS
    are taken; one character more is refused; and a third frame is refused, not ignored."""
    applied = []
    inbox = TrajectoryInbox(lambda rollout: applied.append(rollout), version=lambda: 0)
    at_most = json.dumps({"k": "x" * (MAX_REWARDS_JSON_CHARS - 9)})
    assert len(at_most) == MAX_REWARDS_JSON_CHARS
    for sequence, (worker, rewards) in enumerate([("w" * MAX_WORKER_ID_CHARS, ""), ("w", at_most)]):
        assert inbox.handle(frames(worker, 1, sequence, rewards_json=rewards)).status == AckStatus.ACK_STATUS_ACCEPTED
    assert inbox.handle(frames("w" * (MAX_WORKER_ID_CHARS + 1), 1, 9)).reason == \
        f"malformed message: a worker_id of {MAX_WORKER_ID_CHARS + 1} characters (at most {MAX_WORKER_ID_CHARS})"
    assert inbox.handle(frames("w", 1, 9, rewards_json=at_most + " ")).reason == "malformed message: a " \
        f"rewards_json of {MAX_REWARDS_JSON_CHARS + 1} characters (at most {MAX_REWARDS_JSON_CHARS})"
    assert inbox.handle([*frames("w", 1, 9), b""]).reason == "malformed message: 3 frames"
    assert len(applied) == 2


def test_a_resent_trajectory_is_acked_again_but_applied_once():
    applied = []
    inbox = TrajectoryInbox(lambda rollout: applied.append(rollout.num_steps), version=lambda: 7)
    first = inbox.handle(frames("w", 1, 0))
    again = inbox.handle(frames("w", 1, 0))
    assert (first.status, again.status) == (AckStatus.ACK_STATUS_ACCEPTED, AckStatus.ACK_STATUS_DUPLICATE)
    assert (again.worker_id, again.incarnation, again.sequence, again.policy_version) == ("w", 1, 0, 7)
    # The key is (worker, incarnation, sequence): a restarted worker (new incarnation) starts afresh.
    assert inbox.handle(frames("w", 2, 0)).status == AckStatus.ACK_STATUS_ACCEPTED
    assert inbox.handle(frames("w", 1, 1)).status == AckStatus.ACK_STATUS_ACCEPTED
    assert inbox.handle(frames("w", 1, 1)).status == AckStatus.ACK_STATUS_DUPLICATE
    assert len(applied) == 3
    assert inbox.accepted == [("w", 1, 0), ("w", 2, 0), ("w", 1, 1)] and inbox.duplicates == 2


def test_a_trajectory_from_before_truncation_was_dropped_is_learned_from():
    """Rollouts once carried `truncated`, never set (episodes are never cut): one spooled by a worker of that
    version is accepted after the upgrade, not refused and deleted; one with a step truncated is refused."""
    applied = []
    inbox = TrajectoryInbox(lambda rollout: applied.append(rollout.num_steps), version=lambda: 0)
    legacy = tiny_rollout().tensors() | {"truncated": torch.zeros((2, 1), dtype=torch.bool)}
    assert inbox.handle(frames("w", 1, 0, pack(legacy))).status == AckStatus.ACK_STATUS_ACCEPTED
    cut = legacy | {"truncated": torch.ones((2, 1), dtype=torch.bool)}
    refused = inbox.handle(frames("w", 1, 1, pack(cut)))
    assert refused.status == AckStatus.ACK_STATUS_REJECTED and "truncated is set" in refused.reason
    other = inbox.handle(frames("w", 1, 2, pack(tiny_rollout().tensors() | {"extra": torch.zeros(1)})))
    assert other.status == AckStatus.ACK_STATUS_REJECTED and "unexpected ['extra']" in other.reason
    assert applied == [2]


def test_a_refused_trajectory_is_never_applied_and_stays_refused():
    applied = []
    inbox = TrajectoryInbox(lambda rollout: applied.append(1) or "too old", version=lambda: 0)
    assert inbox.handle(frames("w", 1, 0)).status == AckStatus.ACK_STATUS_REJECTED  # apply refused it
    ack = inbox.handle(frames("w", 1, 1, payload=b"\x93not a map"))
    assert ack.status == AckStatus.ACK_STATUS_REJECTED and "msgpack" in ack.reason
    assert inbox.handle(frames("w", 1, 1)).status == AckStatus.ACK_STATUS_REJECTED  # decided once
    assert inbox.handle([b"\xff\xff"]).status == AckStatus.ACK_STATUS_REJECTED
    assert applied == [1] and inbox.accepted == []


def test_the_decided_keys_survive_a_restart_through_state():
    """What the learner's checkpoint holds: a restored inbox answers DUPLICATE for what it had accepted."""
    answers = iter([None, "too old"])  # the first applied, the second refused
    inbox = TrajectoryInbox(lambda rollout: next(answers), version=lambda: 0)
    inbox.handle(frames("w", 1, 0))
    inbox.handle(frames("w", 1, 0))
    inbox.handle(frames("w", 1, 1))
    restored = TrajectoryInbox(lambda rollout: pytest.fail("applied twice"), version=lambda: 0)
    restored.load(inbox.state())
    assert restored.handle(frames("w", 1, 0)).status == AckStatus.ACK_STATUS_DUPLICATE
    assert restored.handle(frames("w", 1, 1)).status == AckStatus.ACK_STATUS_REJECTED  # still refused
    assert restored.accepted == [("w", 1, 0)] and restored.duplicates == 3 and restored.rejected == 1


def test_the_spool_gives_a_restarted_worker_its_unacked_trajectories_and_progress(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(SpoolBusy):  # a second live worker on the same directory
        Spool(tmp_path)
    for sequence in range(3):
        spool.put(("w", 9, sequence), frames("w", 9, sequence), progress=sequence + 1)
    spool.remove(("w", 9, 2))  # the newest is acked first: its progress is kept on disk
    spool.remove(("w", 9, 0))
    spool.close()
    (tmp_path / "torn.tmp").write_bytes(b"half")  # a write that a kill interrupted is not an entry

    again = Spool(tmp_path)
    assert again.load() == {("w", 9, 1): frames("w", 9, 1)}  # byte for byte, under its old key
    assert again.progress == 3 and again.bytes > 0
    again.remove(("w", 9, 1))
    assert again.bytes == 0 and not list(tmp_path.glob("*.traj")) and not (tmp_path / "torn.tmp").exists()
    again.close()


def test_a_restarted_worker_resends_the_spooled_trajectories_oldest_first(tmp_path):
    """Each process's incarnation is random, so the files' names do not order them: their times do (a mutation
    ordering by name survived). The learner then meets a worker's trajectories in the order they were played."""
    spool = Spool(tmp_path)
    older, newer = ("w", 0xFFFF, 0), ("w", 0x0001, 0)  # a killed process's, then its successor's
    for i, key in enumerate((older, newer)):
        spool.put(key, frames(*key), progress=i + 1)
        os.utime(spool._path(key), ns=(i * 10**9, i * 10**9))
    spool.close()
    again = Spool(tmp_path)
    assert list(again.load()) == [older, newer]
    again.close()


@pytest.mark.parametrize("content", [b"abc", b"\0" * 40, b"cut short", "a folder", "a link to nothing"])
def test_a_spooled_file_that_is_not_a_whole_trajectory_is_named(tmp_path, content):
    """Cut short, not the spool's own, a header of another format, or no file at all: one error naming it (the
    worker stops on it in one line, exit 2), not a struct.error, DecodeError or IsADirectoryError traceback."""
    spool = Spool(tmp_path)
    spool.put(("w", 9, 0), frames("w", 9, 0), progress=1)
    path = next(tmp_path.glob("*.traj"))
    whole = path.read_bytes()
    if isinstance(content, str):
        path.unlink()
        path.mkdir() if content == "a folder" else path.symlink_to(tmp_path / "nowhere")
    else:
        path.write_bytes(whole[:SPOOL_HEAD.size + 2] if content == b"cut short" else content)  # in its header frame
    with pytest.raises(SpoolCorrupt, match=f"^{path} is not a whole spooled trajectory"):
        spool.load()
    spool.close()


def test_a_torn_write_that_is_no_file_is_named(tmp_path):
    """A folder where a kill leaves a torn write (*.tmp) had ended the worker in an IsADirectoryError traceback."""
    (tmp_path / "x.tmp").mkdir()
    with pytest.raises(SpoolCorrupt, match=f"^{tmp_path / 'x.tmp'} is not a file: move it out of the spool"):
        Spool(tmp_path)


def test_tensor_frames_round_trip_and_refuse_what_is_not_a_tensor():
    tensors = {"x": torch.randn(3, 4), "n": torch.tensor(5.0, dtype=torch.float64),
               "mask": torch.rand(2, 3) > 0.5, "i": torch.arange(6).view(2, 3)}
    back = unpack(pack(tensors))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    with pytest.raises(ValueError, match="dtype"):
        unpack(msgpack.packb({"x": {"dtype": "object", "shape": [1], "data": b"\0" * 8}}))
    with pytest.raises(ValueError, match="bytes"):
        unpack(msgpack.packb({"x": {"dtype": "float32", "shape": [3], "data": b"\0" * 8}}))


class LocalServer:
    """tamiyo_server without gRPC: the policy built from the published weights frames."""

    def __init__(self, learner: Learner):
        self.load(learner)

    def load(self, learner: Learner) -> None:
        version, state = decode_weights(weights_frames(learner.version, learner.policy_state()))
        self.policy = policy_from_state(state, str(version), greedy=False, seed=version)

    def decide_batch(self, observations):
        return [self.policy.decide(o) for o in observations]


def test_actor_learner_loop_updates_and_versions_every_transition(synthetic_data, tmp_path):
    cfg = TrainerConfig(env=TOY, n_envs=2, update_every=2, episodes=10, seed=0)  # 4 episodes per update
    learner = Learner(cfg, Telemetry("learner"), max_policy_lag=1)
    server = LocalServer(learner)
    spec, codec = learner.trainer.spec, learner.trainer.codec

    def play(first: int) -> Rollout:
        episodes = range(first, first + 2)
        envs = make_envs(learner.trainer.env_cfg, {"cpu": synthetic_data}, ("cpu",),
                         lambda e: Telemetry(f"ep{e}"), episodes, make_env)
        rollout, _ = play_round(envs, list(episodes), [Rewarder(cfg.reward, cfg.ppo.gamma) for _ in envs],
                                codec, remote_act(server, spec), TOY.max_epochs)
        return Rollout(**unpack(pack(rollout.tensors())))  # as the learner receives it

    stale = play(0)
    assert stale.policy_version.eq(0).all() and stale.obs.shape == (4, 2, spec.dim)
    assert learner.add(play(2)) is None and not learner.ready()
    assert learner.add(play(4)) is None and learner.ready()
    learner.update()
    server.load(learner)
    fresh = play(6)
    assert fresh.policy_version.eq(1).all()
    assert learner.add(fresh) is None and learner.add(play(8)) is None
    learner.update()
    assert learner.version == 2 and learner.trainer.episodes_done == 8
    assert [u["update"] for u in learner.trainer.update_log] == [1, 2]
    assert "more than 1 updates old" in learner.add(stale)  # version 0 is two updates behind
    wrong = Rollout(**(stale.tensors() | {"obs": stale.obs[..., :-1]}))
    assert "obs" in learner.problem(wrong)

    # A restarted learner continues from its checkpoint: version, normalizers of each live version.
    restored = Learner(cfg, Telemetry("restarted"), max_policy_lag=1)
    restored.load_state_dict(learner.state_dict())
    assert restored.version == 2 and sorted(restored.obs_stats) == sorted(learner.obs_stats) == [1, 2]
    # The seeds it learned from are the workers' (episodes 2-9 here), whatever the learner's own --seed (0):
    # what a comparison must hold out.
    assert learner.trainer.trained_seeds == restored.trainer.trained_seeds == set(range(2, 10))
    assert restored.add(fresh) is None  # version 1's statistics came back with it
    # Its checkpoint loaded as a policy (esper train learned, esper compare) is the version it served: with that
    # version's statistics, not obs_rms, which has gone on with the rows pending since (it had been).
    save_checkpoint(restored.state_dict(), tmp_path / "learner.pt")
    loaded, served = load_policy(tmp_path / "learner.pt"), policy_from_state(restored.policy_state(), "2")
    same = lambda a, b: all(torch.equal(a.state()[k], b.state()[k]) for k in a.state())  # noqa: E731
    assert not same(restored.trainer.obs_rms, served.obs_rms)
    assert same(loaded.obs_rms, served.obs_rms) and loaded.version == "2"
    from_train_ppo = Learner(cfg, Telemetry("from esper train ppo"), max_policy_lag=1)
    from_train_ppo.load_state_dict(learner.trainer.state_dict())  # no per-version statistics: the current only
    assert sorted(from_train_ppo.obs_stats) == [2]
