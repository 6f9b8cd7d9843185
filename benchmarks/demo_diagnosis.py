"""Why the demo's one-step generator misses its teacher: what generator, fake score and teacher each believe.

Trains the demo config (or any toy config) and at every --every iterations prints, against the exact truth:
  - the EMA and the raw generator's FD, mode weights TV and spread_ratio (the EMA at the run's half-life and at
    --halflives more: how much of the gap is the generator wandering from step to step);
  - the fake score's own belief: its 25-step DDIM sampler's spread and TV. The fake score should denoise the
    generator's distribution, so its sampler should look like the teacher's sampler would for the generator's
    modes; a gap between the two is fake-score tracking error (lag or noise);
  - per mode, the offset of the samples' coordinate-wise median from the true mean and the samples' median distance
    from that median, both per element in units of the mode std (width 1: the true width); medians, so that
    samples between modes do not count, and offset and width are told apart (spread_ratio mixes them).

    OMP_NUM_THREADS=1 python benchmarks/demo_diagnosis.py bigsid/configs/demo_sd.yaml runs/diag teacher.path=TEACHER
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch

from bigsid import toy
from bigsid.config import load_config
from bigsid.trainer import EMA, Trainer


def offset_width(samples: dict[str, torch.Tensor], truth: toy.GMM) -> tuple[float, float]:
    offsets, widths = [], []
    for i, prompt in enumerate(truth.prompts):
        x = samples[prompt].flatten(1).double()
        _, mode = truth.nearest_mode(x, i)
        for k in range(truth.means.shape[1]):
            xk = x[mode == k]
            if len(xk) < 10:  # a lost mode has no width; the TV says it is lost
                continue
            centre = xk.median(0).values
            offsets.append(((centre - truth.means[i, k].double()).square().mean().sqrt() / truth.std).item())
            # the median of a chi_D variable is ~ sqrt(D - 2/3)
            widths.append(((xk - centre).norm(dim=1).median() / (truth.std * (truth.dim - 2 / 3) ** 0.5)).item())
    return sum(offsets) / len(offsets), sum(widths) / len(widths)


def noise_left(samples: dict[str, torch.Tensor], noise: dict[str, torch.Tensor], truth: toy.GMM) -> tuple[float, float]:
    """How much of the generator's within-mode error is its input noise passed through: per mode, the least-squares
    c in x_gen - centre ~ c z, and the share of the error's square that c z explains. A generator started from the
    teacher at t_init reads x0 = a x_t - s v from x_t = s z, so it must cancel a s z (0.345 z at t_init 625) with its
    v output; what it leaves shows up here as c, and as width the truth's modes do not have."""
    coefs, shares = [], []
    for i, prompt in enumerate(truth.prompts):
        x, z = samples[prompt].flatten(1).double(), noise[prompt].flatten(1).double()
        _, mode = truth.nearest_mode(x, i)
        for k in range(truth.means.shape[1]):
            if (mode == k).sum() < 10:
                continue
            r, zk = x[mode == k] - x[mode == k].median(0).values, z[mode == k]
            c = (r * zk).sum() / zk.square().sum()
            coefs.append(c.item())
            shares.append((c.square() * zk.square().sum() / r.square().sum()).item())
    return sum(coefs) / len(coefs), sum(shares) / len(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--halflives", nargs="*", type=int, default=[18000, 36000], help="more EMAs, in images")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"train.run_dir={args.run_dir}", "train.progress=false", "train.sample_every=0",
                                    "train.checkpoint_every=0", "train.eval_every=0", *args.overrides])
    shutil.rmtree(args.run_dir, ignore_errors=True)
    trainer = Trainer(cfg)
    ground_truth = trainer._ground_truth()
    truth, encoder, net = ground_truth.truth, trainer.networks.encoder, trainer.networks
    first = ground_truth.score(trainer.generator.inner, encoder)
    print(f"teacher sampler: FD {first['fd_teacher_sampler']:.3f} TV {first['mode_coverage_tv_teacher_sampler']:.3f} "
          f"spread {first['spread_ratio_teacher_sampler']:.3f} offset/width %.3f %.3f | exact sampler: FD "
          f"{first['fd_exact_sampler']:.3f} spread {first['spread_ratio_exact_sampler']:.3f} offset/width %.3f %.3f "
          f"| noise floor {first['fd_reference']:.3f}"
          % (*offset_width(ground_truth.sets["teacher_sampler"], truth),
             *offset_width(ground_truth.sets["exact_sampler"], truth)), flush=True)
    extra = {h: EMA(trainer.generator) for h in args.halflives}
    total, start = cfg.train.total_nimg // cfg.train.batch_size, time.time()
    while trainer.step < total:
        metrics = trainer.train_step()
        for h, ema in extra.items():
            ema.update(trainer.generator, EMA.beta(cfg.train.batch_size, trainer.nimg, h, 0.0))
        if trainer.step % args.every and trainer.step != total:
            continue
        with torch.no_grad():
            raw = ground_truth.score(trainer.generator.inner, encoder)
            # the generator's input kept beside its output, for noise_left
            noise = {p: torch.randn(1000, *truth.latent_shape, generator=torch.Generator().manual_seed(3 + i))
                     for i, p in enumerate(truth.prompts)}
            with trainer.ema.applied(trainer.generator) as g:
                ema = ground_truth.score(g, encoder)
                generated = {p: g(z.to(trainer.device), encoder([p] * len(z))).float().cpu() for p, z in noise.items()}
            fake = {p: toy.sample_teacher(trainer.fake_score.inner, net.schedule, net.scheduler_config, encoder, p,
                                          500, truth.latent_shape, 25, 7 + i) for i, p in enumerate(truth.prompts)}
            longer = []
            for h, e in extra.items():
                with e.applied(trainer.generator) as g:
                    s = ground_truth.score(g, encoder)
                longer.append(f"EMA {h}: FD {s['fd_generator']:.3f} TV {s['mode_coverage_tv']:.3f}")
        fake_scores = [toy.mode_scores(fake[p], truth, i, ground_truth.weights[i]) for i, p in enumerate(truth.prompts)]
        print(f"step {trainer.step} ({time.time() - start:.0f} s): EMA FD {ema['fd_generator']:.3f} "
              f"TV {ema['mode_coverage_tv']:.3f} spread {ema['spread_ratio']:.3f} | raw FD {raw['fd_generator']:.3f} "
              f"TV {raw['mode_coverage_tv']:.3f} | {' | '.join(longer)} | fake-score sampler: spread "
              f"{sum(s['spread_ratio'] for s in fake_scores) / len(fake_scores):.3f} TV "
              f"{sum(s['mode_coverage_tv'] for s in fake_scores) / len(fake_scores):.3f} | offset/width: EMA "
              "generator %.3f %.3f, fake-score sampler %.3f %.3f | noise left in the generator: c %.3f, share %.2f "
              "| fake-score loss %.3f"
              % (*offset_width(generated, truth), *offset_width(fake, truth), *noise_left(generated, noise, truth),
                 float(metrics["fake_score/loss"])),
              flush=True)


if __name__ == "__main__":
    main()
