"""PPO pieces against hand-computed values: GAE (termination), the entropy schedule, the
normalizers, and a KL early stop that really stops."""

import dataclasses
import math

import pytest
import torch

from esper.simic.ppo import PPOConfig, RewardNormalizer, compute_gae, ent_coef_at, ppo_update
from esper.simic.rollout import Rollout
from esper.tamiyo.features import RunningMeanStd
from esper.tamiyo.network import ActorCritic

GAMMA, LAMBDA = 0.9, 0.8


def column(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)[:, None]  # [T, 1]


def test_gae_terminated_episode_by_hand():
    """r = 1, 2, 3; V = .5, 1, 1.5; the last step terminates (its next value, 9.9, must be ignored)."""
    adv, ret = compute_gae(column(1, 2, 3), column(0.5, 1.0, 1.5), column(1.0, 1.5, 9.9),
                           column(0, 0, 1, dtype=torch.bool), GAMMA, LAMBDA)
    # delta2 = 3 - 1.5 = 1.5;  delta1 = 2 + .9 * 1.5 - 1 = 2.35;  delta0 = 1 + .9 * 1 - .5 = 1.4
    # A2 = 1.5;  A1 = 2.35 + .72 * 1.5 = 3.43;  A0 = 1.4 + .72 * 3.43 = 3.8696
    torch.testing.assert_close(adv[:, 0], torch.tensor([3.8696, 3.43, 1.5]))
    torch.testing.assert_close(ret[:, 0], torch.tensor([4.3696, 4.43, 3.0]))


def test_gae_stops_at_a_termination_inside_the_buffer():
    """Episode A ends at step 1 and episode B fills steps 2 and 3 of the same column: A's advantages take
    nothing of B's, neither its value (7.0) as a bootstrap nor its advantages."""
    adv, _ = compute_gae(column(1, 1, 0, 2), column(1.0, 1.5, 7.0, 0.25), column(1.5, 7.0, 0.25, 0.0),
                         column(0, 1, 0, 1, dtype=torch.bool), GAMMA, LAMBDA)
    # delta3 = 2 - .25 = 1.75 = A3;  delta2 = .9 * .25 - 7 = -6.775;  A2 = -6.775 + .72 * 1.75 = -5.515
    # delta1 = 1 - 1.5 = -.5 = A1 (bootstrapping from episode B's 7.0 would give 5.8);
    # delta0 = 1 + .9 * 1.5 - 1 = 1.35;  A0 = 1.35 + .72 * -.5 = .99
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.99, -0.5, -5.515, 1.75]))


def test_gae_at_lambda_one_is_the_monte_carlo_return_minus_value():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 1.0]])  # [T=3, N=2]
    values = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.9, 0.6]])
    next_values = torch.cat([values[1:], torch.zeros(1, 2)])
    terminated = torch.tensor([[False, False], [False, False], [True, True]])
    adv, ret = compute_gae(rewards, values, next_values, terminated, 0.5, 1.0)
    torch.testing.assert_close(ret[:, 0], torch.tensor([1 + 0.25 * 5, 0.5 * 5, 5.0]))
    torch.testing.assert_close(ret[:, 1], torch.tensor([0.5 * 2 + 0.25 * 1, 2 + 0.5 * 1, 1.0]))
    torch.testing.assert_close(adv, ret - values)


def test_entropy_schedule_anneals_to_its_floor():
    cfg = PPOConfig(ent_coef_start=0.2, ent_coef_end=0.0, ent_coef_min=0.05, ent_anneal_episodes=10)
    assert ent_coef_at(cfg, 0, 100) == pytest.approx(0.2)
    assert ent_coef_at(cfg, 5, 100) == pytest.approx(0.1)
    assert ent_coef_at(cfg, 10, 100) == ent_coef_at(cfg, 50, 100) == pytest.approx(0.05)  # floored
    constant = PPOConfig()
    assert ent_coef_at(constant, 0, 100) == ent_coef_at(constant, 99, 100) == 0.05
    whole_run = PPOConfig(ent_coef_start=0.1, ent_coef_end=0.02)  # 0 anneal episodes: over the whole run
    assert ent_coef_at(whole_run, 50, 100) == pytest.approx(0.06)
    to_zero = PPOConfig(ent_coef_start=0.1, ent_coef_end=0.0)  # no floor unless one is asked for
    assert ent_coef_at(to_zero, 100, 100) == 0.0 and ent_coef_at(PPOConfig(ent_coef=0.0), 0, 100) == 0.0


def test_entropy_floor_may_not_exceed_the_coefficient():
    """The original documented a 0.1 floor under a 0.05 coefficient: the floor replaced it silently."""
    with pytest.raises(ValueError, match="exceeds the entropy coefficient"):
        PPOConfig(ent_coef=0.05, ent_coef_min=0.1)


@pytest.mark.parametrize("field", ["lr", "clip_coef", "ent_coef", "ent_coef_start", "gamma", "target_kl"])
def test_a_setting_that_is_not_finite_is_refused(field):
    """nan passes every comparison: a nan clip coefficient or entropy bonus had trained a policy that never moved."""
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"PPOConfig: {field} must be finite"):
            PPOConfig(**{field: value})


def test_running_mean_std_matches_the_whole_batch():
    data = torch.randn(300, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    rms = RunningMeanStd((4,))
    for chunk in data.split(70):
        rms.update(chunk)
    torch.testing.assert_close(rms.mean, data.double().mean(0), atol=1e-3, rtol=0)
    torch.testing.assert_close(rms.var, data.double().var(0, unbiased=False), atol=1e-2, rtol=1e-3)
    restored = RunningMeanStd((4,))
    restored.load(rms.state())
    assert torch.equal(restored.normalize(data, 10.0), rms.normalize(data, 10.0))


def test_reward_normalizer_scales_by_the_discounted_return_std():
    norm = RewardNormalizer(gamma=0.5, clip=10.0)
    norm.start_episodes(1)
    out = [float(norm(torch.tensor([r]))) for r in (2.0, 2.0, 2.0)]
    # returns 2, 3, 3.5: their running std (with the tiny prior count) scales every reward.
    std = torch.tensor([2.0, 3.0, 3.5], dtype=torch.float64).var(unbiased=False).sqrt()
    assert out[-1] == pytest.approx(2.0 / float(std), rel=1e-3)


def tiny_rollout(agent: ActorCritic, logprob_shift: float = 0.0) -> Rollout:
    """A [T=8, N=2] rollout of the agent's own actions (all legal), logprobs shifted by `logprob_shift`."""
    t, n, dim = 8, 2, 5
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(t * n, dim, generator=g)
    legal = torch.ones(t * n, 4, 3, 2, dtype=torch.bool)
    with torch.no_grad():
        action, logprob, _, value, _ = agent.get_action_and_value(obs, legal, generator=g)
    shape = lambda x: x.view(t, n, *x.shape[1:])  # noqa: E731
    return Rollout(
        obs=shape(obs), legal=shape(legal), actions=shape(action), logprobs=shape(logprob + logprob_shift),
        values=shape(value), next_values=shape(value), rewards=torch.randn(t, n, generator=g),
        reward_parts=torch.zeros(t, n, 4), terminated=torch.zeros(t, n, dtype=torch.bool),
        policy_version=torch.zeros(t, n, dtype=torch.long), seeds=torch.zeros(t, n, dtype=torch.long))


def test_kl_early_stop_really_stops():
    torch.manual_seed(0)
    agent = ActorCritic(5, 3, 2)
    before = [p.detach().clone() for p in agent.parameters()]
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    cfg = PPOConfig(target_kl=0.01, update_epochs=10, num_minibatches=2)
    # Stored log-probs 1 nat below the policy's own: the very first minibatch is far past target_kl.
    stats = ppo_update(agent, optimizer, tiny_rollout(agent, -1.0), cfg, 0.0, torch.Generator().manual_seed(0))
    assert stats.early_stop_epoch == 0 and stats.minibatch_steps == 0 and stats.epochs_run == 1
    assert all(torch.equal(a, b) for a, b in zip(before, agent.parameters()))

    # On its own data the first step is taken (ratio 1, KL 0); with a tiny target the next one stops.
    stats = ppo_update(agent, optimizer, tiny_rollout(agent), dataclasses.replace(cfg, target_kl=1e-9), 0.0,
                       torch.Generator().manual_seed(0))
    assert stats.minibatch_steps == 1 and stats.early_stop_epoch == 0
    stats = ppo_update(agent, optimizer, tiny_rollout(agent), dataclasses.replace(cfg, target_kl=None), 0.0,
                       torch.Generator().manual_seed(0))
    assert stats.minibatch_steps == 20 and stats.early_stop_epoch is None and stats.epochs_run == 10
    assert sum(stats.action_counts.values()) == 16


def test_a_minibatch_whose_gradient_is_not_finite_is_not_stepped_on():
    """Stored log-probabilities 1000 nats below the policy's own and no KL stop: every ratio overflows to inf,
    every gradient is NaN, and no minibatch is stepped on (a step would make every weight NaN for good).
    The weights and Adam's state stay as they were, the skips are counted, and a sound rollout then trains."""
    torch.manual_seed(0)
    agent = ActorCritic(5, 3, 2)
    before = [p.detach().clone() for p in agent.parameters()]
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    cfg = PPOConfig(target_kl=None, update_epochs=10, num_minibatches=2)
    stats = ppo_update(agent, optimizer, tiny_rollout(agent, -1000.0), cfg, 0.0, torch.Generator().manual_seed(0))
    assert stats.nonfinite_skipped == 20 and stats.minibatch_steps == 0 and stats.epochs_run == 10
    assert all(torch.equal(a, b) for a, b in zip(before, agent.parameters()))
    assert not optimizer.state

    stats = ppo_update(agent, optimizer, tiny_rollout(agent), cfg, 0.0, torch.Generator().manual_seed(0))
    assert stats.nonfinite_skipped == 0 and stats.minibatch_steps == 20 and math.isfinite(stats.grad_norm)
    assert all(p.isfinite().all() and not torch.equal(p, b) for p, b in zip(agent.parameters(), before))


def test_one_minibatch_step_is_cleanrls_loss_written_out():
    """One update of one minibatch against CleanRL's loss written out here: the clipped surrogate (the larger
    of the two losses), advantages centred and scaled, the clipped value loss, the entropy bonus, clipfrac,
    and the step itself (SGD at lr 1: the weights move by the loss's gradient). Log-probs and values are moved
    past clip_coef both ways and the advantages have a non-zero mean, so that every clip and the centring
    matter: a min for a max, a sign, or a missing mean each changes a number checked here."""
    import copy

    torch.manual_seed(0)
    agent = ActorCritic(5, 3, 2)
    g = torch.Generator().manual_seed(1)
    r = tiny_rollout(agent)
    r = dataclasses.replace(r, logprobs=r.logprobs + 0.6 * torch.randn(r.logprobs.shape, generator=g),
                            values=r.values + 0.6 * torch.randn(r.values.shape, generator=g), rewards=r.rewards + 1.0)
    cfg = PPOConfig(target_kl=None, update_epochs=1, num_minibatches=1, ent_coef=0.3, max_grad_norm=1e9)
    ref = copy.deepcopy(agent)
    stats = ppo_update(agent, torch.optim.SGD(agent.parameters(), lr=1.0), r, cfg, 0.3,
                       torch.Generator().manual_seed(0))

    adv, ret = compute_gae(r.rewards, r.values, r.next_values, r.terminated, cfg.gamma, cfg.gae_lambda)
    adv, ret = adv.flatten(), ret.flatten()
    _, newlogp, entropy, newv, _ = ref.get_action_and_value(r.obs.flatten(0, 1), r.legal.flatten(0, 1),
                                                            r.actions.flatten(0, 1))
    ratio = (newlogp - r.logprobs.flatten()).exp()
    a = (adv - adv.mean()) / (adv.std() + 1e-8)
    c = cfg.clip_coef
    pg = torch.max(-a * ratio, -a * ratio.clamp(1 - c, 1 + c)).mean()
    old_v = r.values.flatten()
    v = 0.5 * torch.max((newv - ret) ** 2, (old_v + (newv - old_v).clamp(-c, c) - ret) ** 2).mean()
    loss = pg - 0.3 * entropy.mean() + cfg.vf_coef * v
    ref.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= p.grad
    torch.testing.assert_close(torch.tensor(stats.value_loss), v.detach())
    torch.testing.assert_close(torch.tensor(stats.policy_loss), pg.detach())
    assert stats.clipfrac == float(((ratio - 1).abs() > c).float().mean())
    assert 0.1 < stats.clipfrac < 0.9  # the ratio clip is active for some samples, not all
    for p, q in zip(agent.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
