"""Parameterisations (eps / v / x0), min-SNR weights, offset noise and the DiffusionLoss callable."""

import pytest
import torch

from ldm.diffusion import DiffusionLoss, NoiseSchedule, min_snr_weight, model_target, predict_x0_eps
from ldm.errors import UserError


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


def test_v_target_identities():
    x0, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    a = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.001]).view(-1, 1, 1, 1)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    x_t = alpha * x0 + sigma * eps
    v = model_target("v", x0, eps, alpha, sigma)
    torch.testing.assert_close(v, alpha * eps - sigma * x0)
    torch.testing.assert_close(
        alpha * x_t - sigma * v, x0, rtol=1e-5, atol=1e-5
    )  # x0 = sqrt(a) x_t - sqrt(1-a) v
    torch.testing.assert_close(sigma * x_t + alpha * v, eps, rtol=1e-5, atol=1e-5)  # eps recoverable
    for name in ("eps", "v", "x0"):
        target = model_target(name, x0, eps, alpha, sigma)
        x0_hat, eps_hat = predict_x0_eps(name, target, x_t, alpha, sigma)
        # eps -> x0 divides by alpha (and x0 -> eps by sigma): looser where those are small
        torch.testing.assert_close(x0_hat, x0, rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-3, atol=2e-3)
    with pytest.raises(UserError, match="parameterization"):
        model_target("score", x0, eps, alpha, sigma)


def test_min_snr_weights_are_hand_computed():
    snr = torch.tensor([0.0, 0.25, 1.0, 5.0, 25.0])
    torch.testing.assert_close(min_snr_weight("eps", snr, 5.0), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.2]))
    torch.testing.assert_close(
        min_snr_weight("v", snr, 5.0), torch.tensor([0.0, 0.25 / 1.25, 0.5, 5 / 6, 5 / 26])
    )
    torch.testing.assert_close(min_snr_weight("x0", snr, 5.0), torch.tensor([0.0, 0.25, 1.0, 5.0, 5.0]))


def test_loss_is_zero_for_the_exact_target_and_hand_computed_otherwise(schedule):
    x0 = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 400, 990])
    alpha, sigma = (s.view(-1, 1, 1, 1) for s in schedule.alpha_sigma(t))
    seen = {}

    for name in ("eps", "v", "x0"):
        target = model_target(name, x0, noise, alpha, sigma)

        def exact(x_t, t_in, context=None, _target=target):
            seen.update(x_t=x_t, t=t_in, context=context)
            return _target

        loss_fn = DiffusionLoss(schedule, parameterization=name)
        ctx = torch.randn(3, 7, 16)
        loss, logs = loss_fn(exact, x0, {"context": ctx}, t=t, noise=noise)
        assert loss.item() == pytest.approx(0.0, abs=1e-10)
        assert seen["context"] is ctx and torch.equal(seen["t"], t)
        torch.testing.assert_close(seen["x_t"], alpha * x0 + sigma * noise)

        zero = lambda x_t, t_in, **c: torch.zeros_like(x_t)
        loss, logs = loss_fn(zero, x0, t=t, noise=noise)
        torch.testing.assert_close(loss, target.pow(2).mean())
        l1, _ = DiffusionLoss(schedule, name, loss_type="l1")(zero, x0, t=t, noise=noise)
        torch.testing.assert_close(l1, target.abs().mean())

        # min-SNR: per-sample mean errors weighted by the hand-computed weights
        gamma = 5.0
        snr = schedule.snr(t)
        w = {
            "eps": (gamma / snr).clamp(max=1),
            "v": snr.clamp(max=gamma) / (snr + 1),
            "x0": snr.clamp(max=gamma),
        }[name]
        weighted, logs = DiffusionLoss(schedule, name, min_snr_gamma=gamma)(zero, x0, t=t, noise=noise)
        torch.testing.assert_close(weighted, (w * target.pow(2).mean(dim=(1, 2, 3))).mean())
        torch.testing.assert_close(logs["loss_unweighted"], target.pow(2).mean())


def test_timesteps_are_uniform_and_the_generator_makes_it_reproducible(schedule):
    loss_fn = DiffusionLoss(schedule)
    ts = []
    record = lambda x_t, t, **c: ts.append(t) or torch.zeros_like(x_t)
    x0 = torch.zeros(4000, 1, 1, 1)
    loss_a, _ = loss_fn(record, x0, generator=torch.Generator().manual_seed(0))
    loss_b, _ = loss_fn(record, x0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ts[0], ts[1]) and loss_a == loss_b
    t = ts[0].float()
    assert ts[0].min() >= 0 and ts[0].max() <= 999 and ts[0].dtype == torch.int64
    assert abs(t.mean().item() - 499.5) < 15 and abs(t.std().item() - 288.7) < 10  # U{0..999}


def test_offset_noise_statistics(schedule):
    x0 = torch.zeros(512, 4, 16, 16)
    plain = DiffusionLoss(schedule).sample_noise(x0, torch.Generator().manual_seed(0))
    noise = DiffusionLoss(schedule, offset_noise=0.5).sample_noise(x0, torch.Generator().manual_seed(0))
    channel_means = noise.mean(dim=(2, 3))  # (512, 4): offset (var 0.25) + mean of 256 N(0,1) (var 1/256)
    assert abs(channel_means.var().item() - (0.25 + 1 / 256)) < 0.03
    assert abs(plain.mean(dim=(2, 3)).var().item() - 1 / 256) < 1e-3
    assert abs(noise.var().item() - 1.25) < 0.05
    # within one image and channel the offset is a constant: the spatial variance stays 1
    assert abs(noise.var(dim=(2, 3)).mean().item() - 1.0) < 0.02


def test_loss_goes_down_when_training_a_tiny_denoiser(schedule):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(5, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 4, 3, padding=1)
    )

    def model_fn(x_t, t):
        t_map = (t.float() / 1000).view(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[2:])
        return net(torch.cat([x_t, t_map], dim=1))

    loss_fn = DiffusionLoss(schedule, parameterization="v", min_snr_gamma=5.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(64, 4, 8, 8, generator=gen) * 0.2 + torch.tensor([1.0, -1.0, 0.5, 0.0]).view(
        1, 4, 1, 1
    )
    eval_gen = lambda: torch.Generator().manual_seed(123)
    before, _ = loss_fn(model_fn, data, generator=eval_gen())
    for _ in range(80):
        loss, _ = loss_fn(model_fn, data, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = loss_fn(model_fn, data, generator=eval_gen())
    assert after < 0.5 * before, (before.item(), after.item())


def test_bad_options_raise_user_errors(schedule):
    with pytest.raises(UserError, match="loss_type"):
        DiffusionLoss(schedule, loss_type="huber")
    with pytest.raises(UserError, match="parameterization"):
        DiffusionLoss(schedule, parameterization="epsilon")
    with pytest.raises(UserError, match="min_snr_gamma"):
        DiffusionLoss(schedule, min_snr_gamma=0.0)


def test_logit_normal_timesteps_follow_their_quantiles(schedule):
    # t = floor(T * sigmoid(n)), n ~ N(1, 1): median T * sigmoid(1) = 731; P(t < T/2) = Phi(-1) = 0.159
    loss = DiffusionLoss(schedule, timestep_sampling="logit_normal", logit_mean=1.0, logit_std=1.0)
    t = loss.sample_timesteps(40_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    assert abs(t.float().median().item() - 731) < 8
    assert abs((t < 500).float().mean().item() - 0.1587) < 0.01
    uniform = DiffusionLoss(schedule).sample_timesteps(
        40_000, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    assert abs((uniform < 500).float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize(
    "kwargs, named",
    [({"timestep_sampling": "lognormal"}, "timestep_sampling"), ({"logit_std": 0.0}, "logit_std")],
)
def test_bad_timestep_sampling_is_named(schedule, kwargs, named):
    with pytest.raises(UserError, match=named):
        DiffusionLoss(schedule, **kwargs)
