"""SDS maths: schedules, the reconstruction and classic forms, their gradients; the noise
maths they use (guidance.multiview.noise)."""

import pytest
import torch

from guidance.multiview import noise, sds
from guidance.multiview_sds import MultiViewSDS


def alphas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_annealed_timestep_range_follows_the_config():
    cfg = MultiViewSDS.Config()
    g = MultiViewSDS.__new__(MultiViewSDS)     # only the schedule, no model
    g.cfg = cfg
    assert g.t_range(0) == (980, 980)
    assert g.t_range(4000) == (500, 740)
    assert g.t_range(8000) == (20, 500) and g.t_range(20000) == (20, 500)
    cfg2 = MultiViewSDS.Config(min_step_percent=0.3, max_step_percent=[[0, 0.9], [10, 0.5]])
    g.cfg = cfg2
    assert g.t_range(5) == (300, 700)


def test_sample_timestep_is_uniform_on_the_closed_range():
    gen = torch.Generator().manual_seed(0)
    ts = [noise.sample_timestep(10, 12, gen) for _ in range(300)]
    assert set(ts) == {10, 11, 12}


def test_reconstruction_gradient_is_x0_minus_rescaled_prediction():
    torch.manual_seed(0)
    a = alphas()
    views, objects = 4, 2
    x0 = torch.randn(objects * views, 4, 8, 8, requires_grad=True)
    t = torch.full((8,), 600)
    eps = torch.randn_like(x0)
    x_t = noise.add_noise(x0.detach(), eps, t, a)
    eps_c, eps_u = torch.randn_like(x0), torch.randn_like(x0)
    eps_g = sds.classifier_free_guidance(eps_u, eps_c, 10.0)
    loss = sds.reconstruction_loss(x0, x_t, t, eps_g, eps_c, a, views, std_rescale=0.5)
    loss.backward()
    # by hand: per object, the guided x0 prediction rescaled halfway to the conditional std
    ab = a[600]
    hat = (x_t - (1 - ab).sqrt() * eps_g) / ab.sqrt()
    cond = (x_t - (1 - ab).sqrt() * eps_c) / ab.sqrt()
    expected = []
    for o in range(objects):
        h, c = hat[4 * o:4 * o + 4], cond[4 * o:4 * o + 4]
        f = (c.std() + 1e-8) / (h.std() + 1e-8)
        expected.append(0.5 * h * f + 0.5 * h)
    expected = torch.cat(expected)
    torch.testing.assert_close(x0.grad, (x0.detach() - expected) / 8, rtol=1e-4, atol=1e-5)


def test_full_std_rescale_matches_the_conditional_std_per_object():
    torch.manual_seed(1)
    a = alphas()
    x0 = torch.zeros(8, 3, 4, 4, requires_grad=True)
    t = torch.full((8,), 300)
    x_t = torch.randn(8, 3, 4, 4)
    eps_c = torch.randn_like(x_t)
    eps_g = 5 * torch.randn_like(x_t)
    loss = sds.reconstruction_loss(x0, x_t, t, eps_g, eps_c, a, 4, std_rescale=1.0)
    loss.backward()
    target = -x0.grad * 8                                  # x0 = 0 so grad = -x0_hat / N
    cond = noise.predict_x0(x_t, t, eps_c, a)
    for o in range(2):
        assert target[4 * o:4 * o + 4].std().item() == pytest.approx(
            cond[4 * o:4 * o + 4].std().item(), rel=1e-4)


def test_classic_gradient_is_weighted_noise_residual():
    torch.manual_seed(2)
    a = alphas()
    x0 = torch.randn(4, 4, 8, 8, requires_grad=True)
    t = torch.tensor([100, 100, 100, 100])
    eps_true, eps = torch.randn_like(x0), torch.randn_like(x0)
    sds.classic_loss(x0, eps_true, t, eps, a).backward()
    torch.testing.assert_close(x0.grad, (1 - a[100]) * (eps - eps_true) / 4, rtol=1e-5,
                               atol=1e-6)


def test_add_noise_and_predict_x0_invert_each_other():
    a = alphas()
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    x_t = noise.add_noise(x0, eps, t, a)
    torch.testing.assert_close(noise.predict_x0(x_t, t, eps, a), x0, rtol=1e-3, atol=1e-3)


def test_timestep_bounds_are_clamped_integers():
    assert noise.timestep_bounds(0.02, 0.98) == (20, 980)
    assert noise.timestep_bounds(0.5, 2.0) == (500, noise.NUM_TRAIN_TIMESTEPS - 1)
    assert noise.timestep_bounds(0.9, 0.1) == (100, 100)


def test_schedule_clock_is_validated():
    with pytest.raises(Exception, match="schedule_clock"):
        MultiViewSDS.Config(schedule_clock="wall")
