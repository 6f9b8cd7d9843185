"""Can a toy run's one-step generator represent the truth at all, with its optimizer and iteration budget?

Distillation aside: the run's generator, at its start (the teacher's weights at t_init), is regressed straight onto
a map from its own noise to the truth with no samples between modes, the exact denoiser's deterministic DDIM
sampler started from the same z (x_T = z): loss ||G(z) - ODE(z)||^2, with the run's batch and Adam settings (beta1,
beta2, eps, lr_generator unless --lr, and its lr_schedule over its own iterations unless --iters). Every --every
iterations the raw generator is scored as a toy evaluation scores it (FD to the exact moments, samples outside
every mode's 99.9% radius, spread, centre offset, mode weights TV). The ODE map's own scores are printed first:
its modes are narrower than the truth's (the sampler's discretisation), but it leaves no sample between modes.

If the regression, given the best target there is, leaves as many samples between modes (or as wide modes) as the
distilled run does after the same iterations, what limits the run is how fast this network and optimizer can make
the map steep between modes and flat within them, not the distillation objective.

    OMP_NUM_THREADS=1 python benchmarks/generator_capacity.py RUN_DIR [key=value ...] [--iters N] [--lr LR]

key=value overrides the run's config as `bigsid train` does (teacher.student_width=2048: a wider teacher, refitted,
and so a wider generator).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bigsid import toy
from bigsid.config import load_config
from bigsid.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--iters", type=int, default=None, help="default: the run's own, total_nimg / batch_size")
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--lr", type=float, default=None, help="default: the run's optim.lr_generator")
    parser.add_argument("--ode-steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=4000, help="per prompt, per evaluation")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as fresh:  # a run directory with no checkpoint: the networks at their start
        cfg = load_config(f"{args.run_dir}/config.yaml", ["train.progress=false", f"train.run_dir={fresh}",
                                                          "train.eval_every=0", "train.sample_every=0",
                                                          *args.overrides])
        trainer = Trainer(cfg)
    networks, o = trainer.networks, cfg.optim
    truth, encoder, shape = networks.truth, networks.encoder, networks.truth.latent_shape
    generator = trainer.generator.module
    exact = toy.GMMDenoiser(truth, networks.schedule)
    vocab = toy.VocabEncoder(truth.prompts)

    def ode(prompt: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, ODE(z)): the sampler draws its x_T from `seed`, and so does z."""
        z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
        return z, toy.sample_teacher(exact, networks.schedule, networks.scheduler_config, vocab, prompt, n, shape,
                                     args.ode_steps, seed)

    def report(label: str, draw) -> None:
        cells = []
        for i, prompt in enumerate(truth.prompts):
            x = draw(i, prompt)
            m = toy.mode_scores(x, truth, i)
            cells.append(f"FD {toy.frechet_distance(x, truth.moments(i)):.3f} outside {m['off_mode_fraction']:.2f} "
                         f"spread {m['spread_ratio']:.2f} centre {m['centre_offset']:.2f} "
                         f"TV {m['mode_coverage_tv']:.3f}")
        print(f"{label}: " + " | ".join(cells), flush=True)

    report("ODE map", lambda i, prompt: ode(prompt, args.samples, 7)[1])
    lr = o.lr_generator if args.lr is None else args.lr
    iters = args.iters or cfg.train.total_nimg // cfg.train.batch_size
    cfg.train.total_nimg = iters * cfg.train.batch_size  # the schedule spans the iterations run here
    params = [p for p in generator.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps)
    per_prompt = cfg.train.batch_size // len(truth.prompts)
    conds = [encoder([prompt] * per_prompt) for prompt in truth.prompts]
    print(f"{args.run_dir}: generator regressed on the exact ODE map, lr {lr:g} ({o.lr_schedule}) over {iters} "
          f"iterations, batch {per_prompt * len(truth.prompts)}", flush=True)

    def sample(i: int, prompt: str) -> torch.Tensor:
        return toy.sample_generator(generator, encoder, prompt, args.samples, shape, 1000 + i)

    report("iteration 0", sample)
    start = time.time()
    for step in range(1, iters + 1):
        trainer.nimg = (step - 1) * cfg.train.batch_size  # Trainer.lr_factor reads the schedule off nimg alone
        for group in optimizer.param_groups:
            group["lr"] = lr * trainer.lr_factor()
        loss = 0.0
        for i, prompt in enumerate(truth.prompts):
            z, target = (v.to(trainer.device) for v in ode(prompt, per_prompt, 10_000 * step + i))
            loss = loss + (generator(z, conds[i]) - target).square().mean() / len(truth.prompts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            report(f"iteration {step} (loss {loss.item():.4f}, {time.time() - start:.0f} s)", sample)


if __name__ == "__main__":
    main()
