"""PPO with GAE (plugins/hmst/hmst_bench_hmst/ppo.py), the algorithm of HMST's meta-controller:

- GAE by hand on a 3-step trajectory with a done mask; equal to the TD error at lambda 0 and to
  the Monte-Carlo return minus V at lambda 1;
- the clipped policy and value losses by hand; on the first minibatch of an update the ratio is 1,
  the clip fraction 0 and the approx KL 0;
- a toy environment with a known optimal policy (some queries need retrieval, which costs
  compute; others do not): PPO reaches at least 90% of the optimal return within 30 updates,
  seeded, in a few seconds.
"""

from __future__ import annotations

import pytest
import torch

from hmst_bench_hmst.ppo import PPOConfig, gae, ppo_loss, update


def test_gae_by_hand_with_a_done_mask():
    rewards, values = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 1.5])
    dones = torch.tensor([0.0, 1.0, 0.0])  # the episode ends with step 1's action
    adv, ret = gae(rewards, values, dones, torch.tensor(2.0), gamma=0.9, lam=0.8)
    # t=2: 3 + 0.9 * 2.0 - 1.5 = 3.3; t=1 (terminal): 2 - 1.0 = 1.0; t=0: 1 + 0.9 * 1.0 - 0.5 = 1.4,
    # plus 0.9 * 0.8 * 1.0 = 0.72 -> 2.12
    torch.testing.assert_close(adv, torch.tensor([2.12, 1.0, 3.3]))
    torch.testing.assert_close(ret, torch.tensor([2.62, 2.0, 4.8]))


def _random_rollout(seed: int, t: int = 7, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(t, n, generator=g, dtype=torch.float64), torch.randn(t, n, generator=g, dtype=torch.float64)
    dones = (torch.rand(t, n, generator=g) < 0.3).double()
    return rewards, values, dones, torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_is_the_td_error_at_lambda_0_and_monte_carlo_at_lambda_1(seed):
    rewards, values, dones, last = _random_rollout(seed)
    gamma = 0.97
    next_values = torch.cat([values[1:], last[None]])
    td = rewards + gamma * next_values * (1 - dones) - values
    torch.testing.assert_close(gae(rewards, values, dones, last, gamma, 0.0)[0], td)
    mc = torch.zeros_like(rewards)
    following = last
    for t in reversed(range(rewards.shape[0])):  # the discounted return, bootstrapped at the end
        following = rewards[t] + gamma * (1 - dones[t]) * following
        mc[t] = following
    torch.testing.assert_close(gae(rewards, values, dones, last, gamma, 1.0)[0], mc - values)


def test_clipped_losses_by_hand():
    cfg = PPOConfig(clip_coef=0.2, vf_clip=0.2, vf_coef=0.5, ent_coef=0.01, norm_adv=False)
    old = torch.tensor([0.0, 0.0])
    new = torch.log(torch.tensor([1.5, 0.5]))  # ratios 1.5 and 0.5
    adv = torch.tensor([1.0, -2.0])
    old_v, new_v, ret = torch.tensor([1.0, 0.0]), torch.tensor([1.5, 0.1]), torch.tensor([2.0, -1.0])
    out = ppo_loss(new, old, adv, new_v, old_v, ret, torch.tensor([0.3, 0.5]), cfg)
    # policy: row 0 max(-1.5, -1.2) = -1.2; row 1 max(1.0, 1.6) = 1.6 -> mean 0.2
    assert float(out["pg_loss"]) == pytest.approx(0.2)
    # value: row 0 unclipped (1.5 - 2)^2 = 0.25, clipped 1.2 -> 0.64; row 1 (1.1)^2 = 1.21, clip 0.1 -> 1.21
    assert float(out["v_loss"]) == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert float(out["loss"]) == pytest.approx(0.2 - 0.01 * 0.4 + 0.5 * 0.4625)
    assert float(out["clip_frac"]) == 1.0
    assert float(out["approx_kl"]) == pytest.approx(((0.5 - torch.log(torch.tensor(1.5))) + (-0.5 - torch.log(torch.tensor(0.5)))).item() / 2)


# ============================================================================== the toy environment

COST, STEPS, ENVS = 0.3, 8, 16  # retrieval's cost; decisions per episode; parallel episodes


class Retrieval:
    """Each step a query arrives that needs retrieval or not (half of them); answering it right
    earns 1, retrieval costs COST, and a query that needs retrieval is answered right only with
    it. Optimal: retrieve exactly when needed (0.7 or 1 per step). Observation: (need, step / STEPS)."""

    def __init__(self, g: torch.Generator):
        self.g = g
        self.t = 0
        self.need = self._draw()

    def _draw(self):
        return (torch.rand(ENVS, generator=self.g) < 0.5).float()

    def obs(self):
        return torch.stack([self.need, torch.full((ENVS,), self.t / STEPS)], dim=-1)

    def step(self, action: torch.Tensor):
        right = torch.where(self.need.bool(), action.bool(), torch.ones(ENVS, dtype=torch.bool))
        reward = right.float() - COST * action.float()
        self.t += 1
        done = torch.full((ENVS,), float(self.t == STEPS))
        if self.t == STEPS:
            self.t = 0
        self.need = self._draw()
        return reward, done


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh())
        self.pi, self.v = torch.nn.Linear(32, 2), torch.nn.Linear(32, 1)

    def forward(self, obs):
        h = self.body(obs)
        return torch.distributions.Categorical(logits=self.pi(h)), self.v(h).squeeze(-1)


def _episode_return(policy, g) -> tuple[float, float]:
    env, total, best = Retrieval(g), 0.0, 0.0
    for _ in range(STEPS):
        with torch.no_grad():
            action = policy(env.obs())[0].probs.argmax(-1)
        best += float((1 - COST * env.need).mean())
        total += float(env.step(action)[0].mean())
    return total, best


def test_ppo_learns_the_toy_retrieval_policy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    policy, cfg = Policy(), PPOConfig(ent_coef=0.0)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    env, horizon = Retrieval(g), 64
    for _ in range(30):
        obs, actions, logprobs, values, rewards, dones = [], [], [], [], [], []
        for _ in range(horizon):
            o = env.obs()
            with torch.no_grad():
                dist, v = policy(o)
                a = dist.sample()
            r, d = env.step(a)
            obs.append(o), actions.append(a), logprobs.append(dist.log_prob(a)), values.append(v)
            rewards.append(r), dones.append(d)
        with torch.no_grad():
            last = policy(env.obs())[1]
        adv, ret = gae(torch.stack(rewards), torch.stack(values), torch.stack(dones), last, cfg.gamma, cfg.lam)
        flat_obs, flat_act = torch.cat(obs), torch.cat(actions)

        def evaluate(index):
            dist, v = policy(flat_obs[index])
            return dist.log_prob(flat_act[index]), dist.entropy(), v

        stats = update(evaluate, list(policy.parameters()), opt,
                       {"index": torch.arange(len(flat_act)), "logprob": torch.cat(logprobs), "value": torch.cat(values),
                        "advantages": adv.flatten(), "returns": ret.flatten()}, cfg, g)
        first = stats[0]
        assert first["approx_kl"] == pytest.approx(0.0, abs=1e-7) and first["clip_frac"] == 0.0
    total, best = _episode_return(policy, torch.Generator().manual_seed(99))
    assert total >= 0.9 * best, (total, best)
