"""DDPM / DDIM (fedmpi.model.diffusion) against formulas computed independently here."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedmpi.model.diffusion import Diffusion, cosine_betas, linear_betas


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def diff():
    return Diffusion(1000, "linear", 1e-4, 0.02, "mse")


def test_linear_betas():
    b = linear_betas(1000, 1e-4, 0.02)
    assert b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, rel=1e-12)
    assert b[-1] == pytest.approx(0.02, rel=1e-12)
    step = (0.02 - 1e-4) / 999
    np.testing.assert_allclose(np.diff(b), step, rtol=1e-9)
    d = Diffusion(50, "linear", 2e-4, 0.05)
    assert d.T == 50 and d.betas.shape == (50,)
    assert d.betas[0] == pytest.approx(2e-4) and d.betas[-1] == pytest.approx(0.05)


def test_schedule_arrays_are_float64_numpy_and_no_torch_state(diff):
    assert not isinstance(diff, nn.Module)
    arrays = 0
    for name, value in vars(diff).items():
        assert not isinstance(value, torch.Tensor), f"{name} is a torch tensor"
        if isinstance(value, np.ndarray):
            arrays += 1
            assert value.dtype == np.float64, name
            assert value.shape == (diff.T,), name
    assert arrays >= 8
    for name in (
        "betas",
        "alphas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "posterior_variance",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ):
        assert isinstance(getattr(diff, name), np.ndarray), name


def test_alphas_cumprod_matches_running_product(diff):
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    prod, expected = 1.0, []
    for b in betas:
        prod *= 1.0 - b
        expected.append(prod)
    np.testing.assert_allclose(diff.alphas_cumprod, expected, rtol=1e-12)
    np.testing.assert_allclose(diff.alphas_cumprod_prev, [1.0] + expected[:-1], rtol=1e-12)
    # the well-known DDPM endpoint: alpha_bar_T ~ 4e-5 for this schedule
    assert 3e-5 < diff.alphas_cumprod[-1] < 5e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_q_sample_closed_form(diff, dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 2, 3, 3, generator=g, dtype=dtype) * 2 - 1
    noise = torch.randn(5, 2, 3, 3, generator=g, dtype=dtype)
    ts = [0, 1, 250, 998, 999]
    xt = diff.q_sample(x0, torch.tensor(ts), noise)
    assert xt.dtype == dtype and xt.shape == x0.shape
    for i, t in enumerate(ts):
        ab = math.prod(1.0 - (1e-4 + j * (0.02 - 1e-4) / 999) for j in range(t + 1))
        expect = math.sqrt(ab) * x0[i].double() + math.sqrt(1 - ab) * noise[i].double()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(xt[i].double(), expect, rtol=tol, atol=tol)
    # predict_x0 inverts q_sample given the true noise
    torch.testing.assert_close(
        diff.predict_x0(xt, torch.tensor(ts), noise),
        x0,
        rtol=1e-4,
        atol=1e-3 if dtype == torch.float32 else 1e-9,
    )


def _posterior_bayes(betas, t):
    """q(x_{t-1} | x_t, x_0) as (coef on x0, coef on xt, variance) from the product of the
    Gaussians q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t) and q(x_{t-1} | x_0)."""
    a = 1.0 - betas
    ab_prev = math.prod(a[:t])  # alpha_bar_{t-1}
    prior_var = 1.0 - ab_prev
    if prior_var == 0.0:
        return 1.0, 0.0, 0.0
    # likelihood as a function of x_{t-1}: N(x_t / sqrt(a_t), b_t / a_t)
    prec = 1.0 / prior_var + a[t] / betas[t]
    var = 1.0 / prec
    c0 = var * math.sqrt(ab_prev) / prior_var
    ct = var * (a[t] / betas[t]) / math.sqrt(a[t])
    return c0, ct, var


def test_posterior_matches_bayes(diff):
    betas = np.array([1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)])
    for t in [0, 1, 2, 10, 100, 500, 998, 999]:
        c0, ct, var = _posterior_bayes(betas, t)
        assert diff.posterior_mean_coef1[t] == pytest.approx(c0, rel=1e-9, abs=1e-15)
        assert diff.posterior_mean_coef2[t] == pytest.approx(ct, rel=1e-9, abs=1e-15)
        assert diff.posterior_variance[t] == pytest.approx(var, rel=1e-9, abs=1e-15)
    x0 = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    xt = torch.tensor([[1.1, 0.2]], dtype=torch.float64)
    mean, var = diff.q_posterior(x0, xt, torch.tensor([400]))
    c0, ct, v = _posterior_bayes(betas, 400)
    torch.testing.assert_close(mean, c0 * x0 + ct * xt, rtol=1e-10, atol=1e-12)
    assert var.flatten()[0].item() == pytest.approx(v, rel=1e-10)


@pytest.mark.parametrize("t", [1, 30, 700])
def test_posterior_numerically(diff, t):
    """Multiply the two Gaussian densities on a grid and read off mean and variance."""
    betas = np.array([1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)])
    a = 1.0 - betas
    ab_prev = np.prod(a[:t])
    x0, xt = 0.4, -0.25
    prior_m, prior_s = math.sqrt(ab_prev) * x0, math.sqrt(1 - ab_prev)
    lik_m, lik_s = xt / math.sqrt(a[t]), math.sqrt(betas[t] / a[t])
    s = max(prior_s, lik_s)
    grid = np.linspace(min(prior_m, lik_m) - 12 * s, max(prior_m, lik_m) + 12 * s, 400_001)
    logp = (
        -0.5 * (grid - prior_m) ** 2 / prior_s**2
        - 0.5 * (xt - math.sqrt(a[t]) * grid) ** 2 / betas[t]
    )
    w = np.exp(logp - logp.max())
    w /= w.sum()
    m = (w * grid).sum()
    v = (w * (grid - m) ** 2).sum()
    mean, var = diff.q_posterior(
        torch.tensor([x0], dtype=torch.float64),
        torch.tensor([xt], dtype=torch.float64),
        torch.tensor([t]),
    )
    assert mean.item() == pytest.approx(m, rel=1e-5, abs=1e-9)
    assert var.item() == pytest.approx(v, rel=1e-4)


def test_cosine_schedule():
    d = Diffusion(1000, "cosine")
    ab = d.alphas_cumprod
    assert np.all(np.diff(ab) < 0)
    assert 0.999 < ab[0] < 1.0
    assert ab[-1] < 1e-3
    assert np.all((d.betas > 0) & (d.betas <= 0.999))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    # alpha_bar_t = f(t + 1) / f(0) wherever beta was not clipped
    for t in (0, 10, 500, 900):
        assert ab[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(10).shape == (10,)


@pytest.mark.parametrize("T,n", [(1000, 100), (1000, 10), (1000, 1000), (50, 7), (1000, 2)])
def test_ddim_timesteps(T, n):
    ts = Diffusion(T).ddim_timesteps(n)
    assert len(ts) == n
    assert len(set(ts.tolist())) == n
    assert np.all(np.diff(ts) < 0)
    assert ts[0] == T - 1 and ts[-1] == 0
    with pytest.raises(ValueError):
        Diffusion(T).ddim_timesteps(T + 1)
    with pytest.raises(ValueError):
        Diffusion(T).ddim_timesteps(0)


class Oracle(nn.Module):
    """The exact eps-model for a data set that is the single point x_star."""

    def __init__(self, diffusion, x_star):
        super().__init__()
        self.ab = torch.tensor(diffusion.alphas_cumprod)
        self.x_star = x_star

    def forward(self, x, t):
        ab = self.ab[t].to(x.dtype).reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.x_star) / (1 - ab).sqrt()


@pytest.fixture(scope="module")
def x_star():
    return torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8


@pytest.mark.parametrize("steps,eta", [(5, 0.0), (20, 0.0), (10, 1.0)])
def test_ddim_oracle_recovers_point(diff, x_star, steps, eta):
    model = Oracle(diff, x_star)
    out = diff.sample(
        model,
        (4, 1, 6, 6),
        "cpu",
        sampler="ddim",
        steps=steps,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    assert out.shape == (4, 1, 6, 6)
    torch.testing.assert_close(out, x_star.expand(4, -1, -1, -1), atol=1e-4, rtol=0)


def test_ddim_deterministic_for_eta0(diff):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x) * (t.float() / 1000).reshape(-1, 1, 1, 1)

    torch.manual_seed(0)
    model = Net()
    kw = dict(sampler="ddim", steps=8, eta=0.0)
    a = diff.sample(model, (2, 1, 5, 5), "cpu", generator=torch.Generator().manual_seed(5), **kw)
    b = diff.sample(model, (2, 1, 5, 5), "cpu", generator=torch.Generator().manual_seed(5), **kw)
    c = diff.sample(model, (2, 1, 5, 5), "cpu", generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert model.training  # sample() restores the mode


def test_ancestral_oracle_lands_near_point(diff, x_star):
    model = Oracle(diff, x_star)
    out = diff.sample(
        model, (3, 1, 6, 6), "cpu", sampler="ddpm", generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(out, x_star.expand(3, -1, -1, -1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("t", [1, 50, 999])
def test_p_sample_is_posterior_step_under_oracle(diff, x_star, t):
    """With the exact eps, one ancestral step is a draw from q(x_{t-1} | x_t, x*)."""
    model = Oracle(diff, x_star.double())
    xt = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out = diff.p_sample(model, xt, t, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(xt.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    betas = np.array([1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)])
    c0, ct, var = _posterior_bayes(betas, t)
    expect = c0 * x_star.double() + ct * xt + math.sqrt(var) * noise
    torch.testing.assert_close(out, expect, rtol=1e-9, atol=1e-9)


def _replay(x0, T, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, dtype=x0.dtype, generator=g)
    return t, noise


class Recorder(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value
        self.seen = None

    def forward(self, x, t):
        self.seen = (x.clone(), t.clone())
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("kind", ["huber", "mse", "l1"])
def test_loss_selection(kind):
    d = Diffusion(1000, loss=kind)
    x0 = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = Recorder(0.7)
    loss = d.loss(model, x0, generator=torch.Generator().manual_seed(11))
    t, noise = _replay(x0, 1000, 11)
    # the model saw x_t = sqrt(ab) x0 + sqrt(1 - ab) noise at uniformly drawn t
    assert torch.equal(model.seen[1], t)
    ab = torch.tensor(d.alphas_cumprod)[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(model.seen[0], ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    diff = (0.7 - noise).double()
    if kind == "mse":
        expect = (diff**2).mean()
    elif kind == "l1":
        expect = diff.abs().mean()
    else:
        a = diff.abs()
        expect = torch.where(a < 1, 0.5 * a**2, a - 0.5).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    # and the two losses really differ on these errors
    other = (
        (diff**2).mean()
        if kind == "huber"
        else torch.where(diff.abs() < 1, 0.5 * diff**2, diff.abs() - 0.5).mean()
    )
    assert abs(loss.item() - other.item()) > 1e-3


def test_bad_schedule_or_loss():
    with pytest.raises(ValueError):
        Diffusion(10, schedule="quadratic")
    with pytest.raises(ValueError):
        Diffusion(10, loss="l2")


def test_min_snr_weighting():
    plain, weighted = (
        Diffusion(1000, loss="mse"),
        Diffusion(1000, loss="mse", weighting="min_snr", snr_gamma=5.0),
    )
    snr = plain.alphas_cumprod / (1 - plain.alphas_cumprod)
    w = weighted.loss_weight
    # weight 1 where SNR <= gamma (the noisy steps), gamma / SNR below 1 where it is larger
    assert np.allclose(w[snr <= 5], 1.0) and np.allclose(w[snr > 5], 5 / snr[snr > 5])
    assert w[0] < 0.01 and (snr > 5).any() and (snr <= 5).any()
    x0 = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = weighted.loss(Recorder(0.7), x0, generator=torch.Generator().manual_seed(11))
    t, noise = _replay(x0, 1000, 11)
    per_image = ((0.7 - noise).double() ** 2).mean(dim=(1, 2, 3))
    expect = (torch.tensor(w)[t] * per_image).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert (
        loss.item()
        < plain.loss(Recorder(0.7), x0, generator=torch.Generator().manual_seed(11)).item()
    )
    with pytest.raises(ValueError, match="weighting"):
        Diffusion(10, weighting="p2")
