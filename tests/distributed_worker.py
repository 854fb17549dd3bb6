"""One process of ``torchrun --nproc-per-node N tests/distributed_worker.py OUT``: the estimators and a
hybrid optimisation with the perturbed renders split over the processes (gloo on the CPU).

Every process saves what it computed to OUT/rank<R>.pt; tests/test_distributed_cpu.py compares
that with the same computation in one process (``single_process``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from dno import DNOConfig, DNONoise, TrainableNoise, VP, hybrid_gradient, optimize, sample, zeroth_order_gradient  # noqa: E402
from dno.distributed import from_environment  # noqa: E402
from toy_models import Brightness, ToyDenoiser, to_image, vp_sigmas  # noqa: E402

SIGMAS = vp_sigmas(4)
Q, CHUNK, MU = 12, 2, 0.05


class NoGradBrightness(Brightness):
    name = "brightness (no gradient)"
    differentiable = False


def problem():
    noise = DNONoise.from_seed((2, 4, 6, 6), 4, seed=3, sde=True)
    params = TrainableNoise(noise, [0, 1, 2], optimize_x_T=True)
    return ToyDenoiser("eps"), params


def estimates(share=None):
    """(hybrid estimate, zeroth-order estimate, the chunk sizes this process rendered)."""
    denoiser, params = problem()
    rendered = []

    def render(noise):
        rendered.append(noise.batch_size // params.batch_size)
        return to_image(sample(denoiser, noise, SIGMAS, VP, 1.0))

    reward = Brightness()
    with torch.no_grad():
        image = render(params.assemble())
        r0 = reward(image)
    rendered.clear()
    hybrid, count = hybrid_gradient(render, reward, params, image, r0, MU, Q, CHUNK,
                                    torch.Generator().manual_seed(5), share)
    zeroth, count_z = zeroth_order_gradient(render, reward, params, r0, MU, Q, CHUNK,
                                            torch.Generator().manual_seed(6), share)
    assert count == count_z == Q * params.batch_size
    return hybrid, zeroth, list(rendered)


def optimisation(share=None, callback=None):
    noise = DNONoise.from_seed((2, 4, 6, 6), 4, seed=3, sde=True)
    result = optimize(ToyDenoiser("eps"), SIGMAS, NoGradBrightness(), to_image, noise, VP, eta=1.0,
                      config=DNOConfig(steps=3, lr=0.05, q=Q, mu=MU, estimator_batch=CHUNK, method="hybrid"),
                      callback=callback, estimator_share=share)
    return torch.tensor([h.reward for h in result.history]), result.latent


def single_process():
    hybrid, zeroth, rendered = estimates()
    rewards, latent = optimisation()
    return {"hybrid": hybrid, "zeroth": zeroth, "rendered": rendered, "rewards": rewards, "latent": latent}


def main(out: str) -> None:
    torch.set_num_threads(1)
    processes = from_environment("cpu")
    share = processes.estimator_share()
    hybrid, zeroth, rendered = estimates(share)
    rewards, latent = optimisation(share)
    torch.save({"hybrid": hybrid, "zeroth": [z.clone() for z in zeroth], "rendered": rendered,
                "rewards": rewards, "latent": latent, "rank": processes.rank, "world": processes.world,
                "backend": processes.backend}, Path(out) / f"rank{processes.rank}.pt")
    processes.close()


if __name__ == "__main__":
    main(sys.argv[1])
