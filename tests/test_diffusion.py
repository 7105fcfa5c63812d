"""fast_unet.diffusion: the drop-in Diffusion, DDIM and the fast sampler (CPU; tiny sizes)."""
import pytest
import torch
from torch import nn

from fast_unet.diffusion import Diffusion, ddim_timesteps


class TinyEps(nn.Module):
    """A cheap stand-in noise predictor: depends on x and t, deterministic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.emb = nn.Linear(1, 3)
        self.modes = []

    def forward(self, x, t):
        self.modes.append(self.training)
        return self.conv(x) + self.emb(t[:, None].float() / 1000)[:, :, None, None]


def _model():
    torch.manual_seed(1)
    return TinyEps()


# -- the original's formulas, written out from the facts it is built on (not its code) ------------------------

def _orig_schedule(noise_steps, beta_start, beta_end):
    beta = torch.linspace(beta_start, beta_end, noise_steps)
    alpha = 1.0 - beta
    return beta, alpha, torch.cumprod(alpha, dim=0)


def _orig_noise_images(alpha_hat, x, t):
    s = torch.sqrt(alpha_hat[t])[:, None, None, None]
    s1 = torch.sqrt(1 - alpha_hat[t])[:, None, None, None]
    e = torch.randn_like(x)
    return s * x + s1 * e, e


def test_schedule_and_noise_images_match_the_original():
    d = Diffusion(noise_steps=1000, img_size=16, device="cpu")
    beta, alpha, alpha_hat = _orig_schedule(1000, 1e-4, 0.02)
    assert torch.equal(d.prepare_noise_schedule(), beta)
    assert torch.equal(d.beta, beta) and torch.equal(d.alpha, alpha) and torch.equal(d.alpha_hat, alpha_hat)

    x = torch.rand(5, 3, 16, 16) * 2 - 1
    torch.manual_seed(123)
    t = d.sample_timesteps(5)
    xt, eps = d.noise_images(x, t)
    torch.manual_seed(123)
    t_ref = torch.randint(low=1, high=1000, size=(5,))
    xt_ref, eps_ref = _orig_noise_images(alpha_hat, x, t_ref)
    assert torch.equal(t, t_ref)
    assert torch.equal(eps, eps_ref) and torch.equal(xt, xt_ref)
    assert t.min() >= 1 and t.max() <= 999


def test_sample_timesteps_range():
    d = Diffusion(noise_steps=10, img_size=8, device="cpu")
    t = d.sample_timesteps(2000)
    assert t.dtype == torch.long and t.min() == 1 and t.max() == 9


def _orig_sample(d, model, n):
    """The original DDPM loop written out from its update rule."""
    beta, alpha_all, alpha_hat_all = _orig_schedule(d.noise_steps, d.beta_start, d.beta_end)
    x = torch.randn((n, 3, d.img_size, d.img_size))
    with torch.no_grad():
        for i in reversed(range(1, d.noise_steps)):
            t = (torch.ones(n) * i).long()
            pn = model(x, t)
            a = alpha_all[t][:, None, None, None]
            ah = alpha_hat_all[t][:, None, None, None]
            b = beta[t][:, None, None, None]
            z = torch.randn_like(x) if i > 1 else torch.zeros_like(x)
            x = 1 / torch.sqrt(a) * (x - ((1 - a) / torch.sqrt(1 - ah)) * pn) + torch.sqrt(b) * z
    return ((x.clamp(-1, 1) + 1) / 2 * 255).type(torch.uint8)


def test_ddpm_sample_matches_original_update_and_modes():
    d = Diffusion(noise_steps=6, img_size=8, device="cpu")
    m = _model()
    torch.manual_seed(7)
    out = d.sample(m, 2, progress=False)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 8, 8)
    assert m.modes and not any(m.modes) and m.training  # eval while sampling, train() after
    torch.manual_seed(7)
    ref = _orig_sample(d, m, 2)
    assert torch.equal(out, ref)


def test_ddim_timesteps_from_list():
    ts = ddim_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 1 and len(ts) == 50
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ddim_timesteps(10, 50) == list(range(9, 0, -1))


def test_ddim_eq12_one_step():
    d = Diffusion(noise_steps=20, img_size=4, device="cpu")
    ts, coefs = d._ddim_table(5, eta=0.5)
    ah = d.alpha_hat.double()
    t, tp = ts[1], ts[2]
    sigma = 0.5 * torch.sqrt((1 - ah[tp]) / (1 - ah[t])) * torch.sqrt(1 - ah[t] / ah[tp])
    expect = torch.stack([torch.sqrt(1 - ah[t]), torch.sqrt(ah[t]), torch.sqrt(ah[tp]),
                          torch.sqrt(1 - ah[tp] - sigma ** 2), sigma]).float()
    assert torch.allclose(coefs[1], expect, rtol=1e-6, atol=0)
    # The last step goes to alpha_hat = 1: the x0 prediction itself, no noise.
    assert coefs[-1][2] == 1 and coefs[-1][3] == 0 and coefs[-1][4] == 0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_deterministic_and_seeded(eta):
    d = Diffusion(noise_steps=50, img_size=8, device="cpu")
    m = _model()
    a = d.sample_ddim(m, 2, steps=5, eta=eta, generator=torch.Generator().manual_seed(3), progress=False)
    b = d.sample_ddim(m, 2, steps=5, eta=eta, generator=torch.Generator().manual_seed(3), progress=False)
    assert torch.equal(a, b) and a.dtype == torch.uint8


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_fast_loop_equals_plain_loop(sampler, eta):
    d = Diffusion(noise_steps=12, img_size=8, device="cpu")
    m = _model()
    if sampler == "ddpm":
        plain = d.sample(m, 3, generator=torch.Generator().manual_seed(5), progress=False)
    else:
        plain = d.sample_ddim(m, 3, steps=4, eta=eta, generator=torch.Generator().manual_seed(5), progress=False)
    fast = d.sample_fast(m, 3, sampler=sampler, steps=4, eta=eta, generator=torch.Generator().manual_seed(5),
                         graph=False, progress=False)
    assert torch.equal(plain, fast)
    seeded = d.sample_fast(m, 3, sampler=sampler, steps=4, eta=eta, seed=5, progress=False)  # graph=True, CPU
    assert torch.equal(seeded, fast)
    assert m.training


def test_fast_loop_float_values_match():
    d = Diffusion(noise_steps=12, img_size=8, device="cpu")
    m = _model()
    g = torch.Generator().manual_seed(9)
    x = d._initial_noise(2, g)
    ts, coefs = d._ddim_table(3, 0.0)
    with torch.no_grad():
        for k, t in enumerate(ts):
            eps = m(x, torch.full((2,), t))
            x = ((x - eps * coefs[k][0]) / coefs[k][1]) * coefs[k][2] + eps * coefs[k][3]
    fast = d.sample_fast(m, 2, steps=3, seed=9, graph=False, progress=False, return_float=True)
    assert torch.equal(x, fast)


def test_bad_sampler_and_generator_device():
    d = Diffusion(noise_steps=5, img_size=4, device="cpu")
    with pytest.raises(ValueError, match="sampler"):
        d.sample_fast(_model(), 1, sampler="plms")


def test_sample_fast_with_fast_unet():
    from fast_unet import UNet
    d = Diffusion(noise_steps=1000, img_size=16, device="cpu")
    m = UNet(device="cpu")
    out = d.sample_fast(m, 1, steps=2, seed=0, progress=False)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.uint8
