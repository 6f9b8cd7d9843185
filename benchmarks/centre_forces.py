"""What holds a toy run's mode centres where they are: the force the generator loss puts on each mode, by t.

For a trained toy run (the demo or any toy config), at its last checkpoint, with the raw generator:
1. Forces. Per band of t, the generator loss's gradient with respect to x_gen, negated (the way gradient descent
   moves each sample), averaged over each mode's inside samples and projected on the mode's outward direction
   (from the prompt's mean of mode means to the mode's mean), in the loss's own units. "direct" is the part with
   the networks' outputs held fixed, w (f_phi - f_psi); the rest runs through the networks' input Jacobians.
   At a fixed point the t-weighted sum is ~0; where the bands disagree in sign, the centres sit where they
   cancel.
2. Posterior means. At x_t = a_t x_gen + s_t eps from inside samples, the outward component of D(x_t) - x_gen for
   the teacher, the exact truth, the fake score, and the exact posterior mean of the generator's own distribution
   (12,000 of its samples as an empirical measure, the noised samples held out), with and without the samples
   outside every mode's radius (replaced by inside samples drawn at random). The fake score should match
   "generator"; the gap between "generator" and "generator without bridges" is what the bridge samples do to it.

    OMP_NUM_THREADS=1 python benchmarks/centre_forces.py RUN_DIR [--bands 10] [--samples 256]
"""

from __future__ import annotations

import argparse
import math

import scipy.stats
import torch

from bigsid import toy
from bigsid.config import load_config
from bigsid.models import predict
from bigsid.trainer import Trainer


def outward(truth: toy.GMM, prompt: int) -> torch.Tensor:
    """[K, D] unit vectors from the prompt's mean of mode means to each mode's mean."""
    mu = truth.means[prompt].double()
    d = mu - mu.mean(0)
    return d / d.norm(dim=1, keepdim=True)


def per_mode(values: torch.Tensor, mode: torch.Tensor, inside: torch.Tensor, units: torch.Tensor) -> list[float]:
    """Mean outward component of `values` [N, D] over each mode's inside samples."""
    return [(values[inside & (mode == k)].double() @ units[k]).mean().item() for k in range(units.shape[0])]


def empirical_posterior_mean(x_t: torch.Tensor, a: float, s: float, points: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] when x0 is uniform over `points`: the exact denoiser of the generator's sample set."""
    return torch.softmax(-torch.cdist(x_t, a * points).square() / (2 * s * s), dim=1) @ points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--bands", type=int, default=10)
    parser.add_argument("--samples", type=int, default=256, help="per prompt and band")
    parser.add_argument("--times", nargs="*", type=int, default=[300, 500, 650, 750, 850, 950])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = load_config(f"{args.run_dir}/config.yaml", ["train.progress=false"])
    trainer = Trainer(cfg)  # resumes from the run's last checkpoint
    truth, encoder, objective = trainer.networks.truth, trainer.networks.encoder, trainer.objective
    schedule, teacher, fake_score = objective.schedule, trainer.teacher, trainer.fake_score.module
    generator = trainer.generator.module
    radius = truth.std * math.sqrt(scipy.stats.chi2.ppf(0.999, truth.dim))
    rng = torch.Generator().manual_seed(args.seed)
    c = cfg.objective
    print(f"{args.run_dir} at step {trainer.step}; outward force per mode, bands of t drawn uniform within the band")
    edges = torch.linspace(c.t_min, c.t_max + 1, args.bands + 1).round().long().tolist()
    for lo, hi in zip(edges[:-1], edges[1:]):
        total, direct = [], []
        for i, prompt in enumerate(truth.prompts):
            n = args.samples
            cond = encoder([prompt] * n)
            with torch.no_grad():
                x_gen = generator(torch.randn(n, *truth.latent_shape, generator=rng), cond, None)
            x_gen.requires_grad_(True)
            t = torch.randint(lo, hi, (n,), generator=rng)
            eps = torch.randn(x_gen.shape, generator=rng)
            loss, _ = objective.generator_loss(teacher, fake_score, x_gen, cond, t, eps)
            grad, = torch.autograd.grad(loss.sum(), x_gen)
            with torch.no_grad():
                x_t = schedule.add_noise(x_gen, eps, t)
                f_phi = predict(teacher, schedule, x_t, t, cond)
                w = objective.sid_weight(x_gen, f_phi).view(-1, *(1,) * (x_gen.ndim - 1))
                fixed = w * (f_phi - predict(fake_score, schedule, x_t, t, cond))
            dist, mode = truth.nearest_mode(x_gen.detach(), i)
            inside, units = dist <= radius, outward(truth, i)
            total += per_mode(-grad.flatten(1), mode, inside, units)
            direct += per_mode(fixed.flatten(1), mode, inside, units)
        print(f"  t {lo:4d}-{hi - 1:4d}: total {sum(total) / len(total):+.3f} [{' '.join(f'{v:+.2f}' for v in total)}]"
              f" | direct {sum(direct) / len(direct):+.3f}")

    print("outward D(x_t) - x_gen over the modes' inside samples, in mode stds:")
    for i, prompt in enumerate(truth.prompts):
        with torch.no_grad():
            drawn = toy.sample_generator(generator, encoder, prompt, 12800, truth.latent_shape,
                                         args.seed + 1 + i).flatten(1).double()
        # the x_gen that are noised are not among the points: a sample's own weight would pin it at small t
        points, held_out = drawn[:12000], drawn[12000:]
        dist, mode = truth.nearest_mode(points, i)
        inside, units = dist <= radius, outward(truth, i)
        keep = torch.nonzero(inside)[:, 0]
        no_bridges = points.clone()
        no_bridges[~inside] = points[keep[torch.randint(0, len(keep), (int((~inside).sum()),), generator=rng)]]
        held_dist, held_mode = truth.nearest_mode(held_out, i)
        x0, x0_mode = held_out[held_dist <= radius], held_mode[held_dist <= radius]
        n = len(x0)
        cond = encoder([prompt] * n)
        for time in args.times:
            t = torch.full((n,), time)
            a, s = (v.double() for v in schedule.coeffs(t, 2))
            x_t = a * x0 + s * torch.randn(x0.shape, generator=rng, dtype=torch.float64)
            net_in = x_t.float().view(n, *truth.latent_shape)
            with torch.no_grad():
                rows = {"teacher": predict(teacher, schedule, net_in, t, cond).flatten(1).double(),
                        "exact truth": truth.posterior_mean(x_t, a, s, torch.full((n,), i)),
                        "fake score": predict(fake_score, schedule, net_in, t, cond).flatten(1).double(),
                        "generator": empirical_posterior_mean(x_t, a[0, 0], s[0, 0], points),
                        "generator without bridges": empirical_posterior_mean(x_t, a[0, 0], s[0, 0], no_bridges)}
            cells = []
            for name, d in rows.items():
                v = per_mode(d - x0, x0_mode, torch.ones(n, dtype=torch.bool), units)
                cells.append(f"{name} {sum(v) / len(v) / truth.std:+.2f}")
            print(f"  prompt {i} t {time}: " + " | ".join(cells))
        offsets = per_mode(points - truth.means[i].double()[mode], mode, inside, units)
        print(f"  prompt {i}: outside every mode {1 - inside.double().mean().item():.2f}; outward centre offset per "
              f"mode (std) {' '.join(f'{v / truth.std:+.2f}' for v in offsets)}")


if __name__ == "__main__":
    main()
