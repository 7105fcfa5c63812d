"""GPU-only: the CUDA-graph sampler against the same loop uncaptured (skipped without CUDA). Not yet run on a
GPU by its author."""
import pytest
import torch

from fast_unet import UNet
from fast_unet.diffusion import Diffusion

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("sampler,eta,steps", [("ddim", 0.0, 10), ("ddim", 1.0, 10), ("ddpm", 0.0, 0)])
def test_graph_replay_matches_uncaptured_loop(sampler, eta, steps):
    torch.manual_seed(0)
    noise_steps = 1000 if sampler == "ddim" else 20
    d = Diffusion(noise_steps=noise_steps, img_size=32, device="cuda")
    m = UNet(device="cuda").cuda()
    outs = []
    for graph in (False, True):
        g = torch.Generator(device="cuda").manual_seed(4)
        outs.append(d.sample_fast(m, 4, sampler=sampler, steps=steps, eta=eta, generator=g, graph=graph,
                                  progress=False, return_float=True))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_graph_replay_default_generator_seeded():
    torch.manual_seed(0)
    d = Diffusion(noise_steps=1000, img_size=32, device="cuda")
    m = UNet(device="cuda").cuda()
    a = d.sample_fast(m, 2, steps=5, eta=1.0, seed=1, progress=False)
    b = d.sample_fast(m, 2, steps=5, eta=1.0, seed=1, progress=False)
    assert torch.equal(a, b)
