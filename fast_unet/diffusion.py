"""A drop-in for the ``Diffusion`` class of dome272/Diffusion-Models-pytorch (``ddpm.py``), plus DDIM and a
fast sampler.

Same constructor, method names, arguments and return values as the original: a training script written for
it runs with ``from fast_unet.diffusion import Diffusion`` and ``from fast_unet import UNet``. The extra
keyword arguments (``generator``, ``progress``) are optional and default to the original behaviour.

- ``sample`` is the DDPM ancestral sampler, step for step the original's update.
- ``sample_ddim`` is DDIM (Song et al. 2020, eq. 12) over a list of timesteps; each step's previous
  timestep is read from that list, never derived by a formula.
- ``sample_fast`` runs either update with preallocated buffers and in-place arithmetic (no per-step tensor
  allocations by the sampler itself); on CUDA one step (model forward, update, fresh noise from the device
  generator) is captured once in a ``torch.cuda.CUDAGraph`` and replayed, with no host sync per step.
  ``graph=False`` runs the same loop uncaptured. For the same generator state it gives the same numbers as
  ``sample`` / ``sample_ddim`` (same arithmetic in the same order).
"""
import logging

import torch
from tqdm import tqdm

__all__ = ["Diffusion", "ddim_timesteps", "to_uint8"]


def to_uint8(x):
    """[-1, 1] floats -> uint8 images, as the original: ``((x.clamp(-1, 1) + 1) / 2 * 255).type(uint8)``."""
    x = (x.clamp(-1, 1) + 1) / 2
    return (x * 255).type(torch.uint8)


def ddim_timesteps(noise_steps, steps):
    """``steps`` timesteps from ``noise_steps - 1`` down to 1 (the trained range; t = 0 is never trained),
    evenly spaced and rounded, duplicates removed, descending."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    steps = min(steps, noise_steps - 1)
    ts = torch.linspace(noise_steps - 1, 1, steps, dtype=torch.float64).round().long().tolist()
    out = []
    for t in ts:
        if not out or t != out[-1]:
            out.append(int(t))
    return out


# The two updates, written once in the order of operations both the plain and the fast loop use. ``c`` is a
# sequence of 0-d (or broadcastable) coefficient tensors; ``buf`` a scratch tensor shaped like x.

def _ddpm_coefs(alpha, alpha_hat, beta, last):
    """DDPM: x = 1/sqrt(alpha) * (x - (1 - alpha)/sqrt(1 - alpha_hat) * eps) + sqrt(beta) * z."""
    inv_sqrt_alpha = 1 / torch.sqrt(alpha)
    k = (1 - alpha) / torch.sqrt(1 - alpha_hat)
    sb = torch.zeros_like(beta) if last else torch.sqrt(beta)
    return torch.stack([k, inv_sqrt_alpha, sb])


def _ddim_coefs(ah_t, ah_prev, eta):
    """DDIM eq. 12: x0 = (x - sqrt(1 - ah_t) eps) / sqrt(ah_t);
    x = sqrt(ah_prev) x0 + sqrt(1 - ah_prev - sigma^2) eps + sigma z."""
    sigma = eta * torch.sqrt((1 - ah_prev) / (1 - ah_t)) * torch.sqrt(1 - ah_t / ah_prev)
    dir_coef = torch.sqrt(torch.clamp(1 - ah_prev - sigma ** 2, min=0))
    return torch.stack([torch.sqrt(1 - ah_t), torch.sqrt(ah_t), torch.sqrt(ah_prev), dir_coef, sigma])


def _ddpm_update_(x, eps, z, buf, c):
    torch.mul(eps, c[0], out=buf)
    x.sub_(buf)
    x.mul_(c[1])
    if z is not None:
        torch.mul(z, c[2], out=buf)
        x.add_(buf)
    return x


def _ddim_update_(x, eps, z, buf, c):
    torch.mul(eps, c[0], out=buf)
    x.sub_(buf)
    x.div_(c[1])          # x is now the x0 prediction
    x.mul_(c[2])
    torch.mul(eps, c[3], out=buf)
    x.add_(buf)
    if z is not None:
        torch.mul(z, c[4], out=buf)
        x.add_(buf)
    return x


class Diffusion:
    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=256, device="cuda"):
        self.noise_steps = noise_steps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.img_size = img_size
        self.device = device

        self.beta = self.prepare_noise_schedule().to(device)
        self.alpha = 1. - self.beta
        self.alpha_hat = torch.cumprod(self.alpha, dim=0)

    def prepare_noise_schedule(self):
        return torch.linspace(self.beta_start, self.beta_end, self.noise_steps)

    def q_sample(self, x, t, noise):
        """``sqrt(alpha_hat[t]) * x + sqrt(1 - alpha_hat[t]) * noise`` (what ``noise_images`` returns, with the
        noise given)."""
        sqrt_alpha_hat = torch.sqrt(self.alpha_hat[t])[:, None, None, None]
        sqrt_one_minus_alpha_hat = torch.sqrt(1 - self.alpha_hat[t])[:, None, None, None]
        return sqrt_alpha_hat * x + sqrt_one_minus_alpha_hat * noise

    def noise_images(self, x, t, generator=None):
        if generator is None:
            eps = torch.randn_like(x)
        else:
            eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        return self.q_sample(x, t, eps), eps

    def sample_timesteps(self, n, generator=None):
        if generator is None:
            return torch.randint(low=1, high=self.noise_steps, size=(n,))
        return torch.randint(low=1, high=self.noise_steps, size=(n,), generator=generator,
                             device=generator.device)

    # -- noise for the plain loops ---------------------------------------------------------------------------
    def _initial_noise(self, n, generator):
        shape = (n, 3, self.img_size, self.img_size)
        if generator is None:  # the original: drawn on the CPU, then moved
            return torch.randn(shape).to(self.device)
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device)

    @staticmethod
    def _step_noise(x, generator):
        if generator is None:
            return torch.randn_like(x)
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)

    # -- the original DDPM sampler ---------------------------------------------------------------------------
    def sample(self, model, n, generator=None, progress=True):
        logging.info(f"Sampling {n} new images....")
        model.eval()
        with torch.no_grad():
            x = self._initial_noise(n, generator)
            for i in tqdm(reversed(range(1, self.noise_steps)), position=0, total=self.noise_steps - 1,
                          disable=not progress):
                t = (torch.ones(n) * i).long().to(self.device)
                predicted_noise = model(x, t)
                alpha = self.alpha[t][:, None, None, None]
                alpha_hat = self.alpha_hat[t][:, None, None, None]
                beta = self.beta[t][:, None, None, None]
                if i > 1:
                    noise = self._step_noise(x, generator)
                else:
                    noise = torch.zeros_like(x)
                x = 1 / torch.sqrt(alpha) * (x - ((1 - alpha) / (torch.sqrt(1 - alpha_hat))) * predicted_noise) \
                    + torch.sqrt(beta) * noise
        model.train()
        return to_uint8(x)

    # -- DDIM, plain loop ------------------------------------------------------------------------------------
    def _ddim_table(self, steps, eta):
        ts = ddim_timesteps(self.noise_steps, steps)
        ah = self.alpha_hat.double().cpu()
        rows = []
        for k, t in enumerate(ts):
            ah_prev = ah[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            rows.append(_ddim_coefs(ah[t], ah_prev, float(eta)))
        return ts, torch.stack(rows).float().to(self.device)

    def sample_ddim(self, model, n, steps=50, eta=0.0, generator=None, progress=True):
        ts, coefs = self._ddim_table(steps, eta)
        model.eval()
        with torch.no_grad():
            x = self._initial_noise(n, generator)
            for k in tqdm(range(len(ts)), position=0, disable=not progress):
                t = torch.full((n,), ts[k], dtype=torch.long, device=self.device)
                eps = model(x, t)
                c = coefs[k]
                x0 = (x - eps * c[0]) / c[1]
                x = x0 * c[2] + eps * c[3]
                if eta > 0 and k + 1 < len(ts):
                    x = x + self._step_noise(x, generator) * c[4]
        model.train()
        return to_uint8(x)

    # -- the fast sampler ------------------------------------------------------------------------------------
    def _ddpm_table(self):
        ts = list(range(self.noise_steps - 1, 0, -1))
        rows = [_ddpm_coefs(self.alpha[i], self.alpha_hat[i], self.beta[i], last=(i == 1)) for i in ts]
        return ts, torch.stack(rows)

    def sample_fast(self, model, n, sampler="ddim", steps=50, eta=0.0, generator=None, seed=None, graph=True,
                    progress=True, return_float=False):
        """DDPM (``sampler="ddpm"``, all ``noise_steps - 1`` steps) or DDIM (``steps``, ``eta``) with static
        buffers and in-place updates. On CUDA with ``graph=True`` one step is captured in a CUDA graph and
        replayed. Noise comes from ``generator`` (on the sampling device), else from a generator seeded with
        ``seed``, else from the device's default generator."""
        if sampler == "ddpm":
            ts, coefs = self._ddpm_table()
            update, noisy = _ddpm_update_, [i > 1 for i in ts]
        elif sampler == "ddim":
            ts, coefs = self._ddim_table(steps, eta)
            update, noisy = _ddim_update_, [eta > 0 and k + 1 < len(ts) for k in range(len(ts))]
        else:
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        device = torch.device(self.device)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        if generator is not None and torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device}, sampling on {device}")

        shape = (n, 3, self.img_size, self.img_size)
        x = torch.empty(shape, device=device)
        z = torch.empty_like(x)
        buf = torch.empty_like(x)
        t_buf = torch.empty((n,), dtype=torch.long, device=device)
        t_table = torch.tensor(ts, dtype=torch.long, device=device)[:, None].expand(len(ts), n).contiguous()
        c_buf = torch.empty_like(coefs[0])
        c = list(c_buf.unbind(0))  # views into c_buf, made once
        t_rows = list(t_table.unbind(0))
        c_rows = list(coefs.unbind(0))
        x.normal_(generator=generator)

        use_graph = graph and x.is_cuda
        model.eval()
        with torch.no_grad():
            bar = tqdm(total=len(ts), position=0, disable=not progress, unit="step")
            if use_graph:
                any_noise = any(noisy)

                def step():
                    eps = model(x, t_buf)
                    if any_noise:
                        z.normal_(generator=generator)
                        update(x, eps, z, buf, c)
                    else:
                        update(x, eps, None, buf, c)

                t_buf.copy_(t_rows[0])  # warm-up runs real inputs (x is restored after the capture)
                c_buf.copy_(c_rows[0])
                g = self._capture(step, x, generator)
                for k in range(len(ts)):
                    t_buf.copy_(t_rows[k], non_blocking=True)
                    c_buf.copy_(c_rows[k], non_blocking=True)
                    g.replay()   # the last DDPM/DDIM step has a 0 noise coefficient: its draw adds exactly 0
                    bar.update(1)
            else:
                for k in range(len(ts)):
                    t_buf.copy_(t_rows[k])
                    c_buf.copy_(c_rows[k])
                    eps = model(x, t_buf)
                    if noisy[k]:
                        z.normal_(generator=generator)
                        update(x, eps, z, buf, c)
                    else:
                        update(x, eps, None, buf, c)
                    bar.update(1)
            bar.close()
        model.train()
        return x if return_float else to_uint8(x)

    @staticmethod
    def _capture(step, x, generator):
        """Warm ``step`` up on a side stream, then capture it once. Warm-up must not change the result: x and
        the generator's state are restored afterwards."""
        x_saved = x.clone()
        gen = generator if generator is not None else torch.cuda.default_generators[x.device.index or 0]
        state = gen.get_state()
        s = torch.cuda.Stream(device=x.device)
        s.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream(x.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        if generator is not None:
            g.register_generator_state(generator)
        with torch.cuda.graph(g):
            step()
        x.copy_(x_saved)
        gen.set_state(state)
        torch.cuda.synchronize(x.device)
        return g
