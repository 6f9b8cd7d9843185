"""Every teacher family against the analytic truth: a tiny pipeline of the family fitted to the toy GMM's exact
denoiser is distilled with SiD, and its one-step FD to exact samples is measured before and after.
benchmarks/bench_families.py runs the same path (bigsid.toy.prepare_family_teacher, the trainer, its ground-truth
evaluation) at benchmark size; this is the test size."""

import pytest

from bigsid.config import GMMConfig, load_config
from bigsid.toy import fd_history, prepare_family_teacher
from bigsid.trainer import Trainer

# D = 16: one patch for the transformers, 2x2 -> 1x1 for the UNets
GMM = GMMConfig(num_prompts=2, modes_per_prompt=2, latent_shape=[4, 2, 2], mode_std=0.1, seed=0)
# the benchmark fits 1,500 steps at peak lr 1e-3; 400 at 1e-3 left SD's 5-step teacher sampler at FD 0.23 from the
# truth, 400 at 3e-3 at 0.06, the exact denoiser's through that sampler 0.05
FIT_STEPS, FIT_LR = 400, 3e-3
ITERATIONS = 100
# The benchmark's SiD settings with its learning rates (3e-5, 1e-4) raised for 100 iterations instead of 600, and an
# EMA half-life of 16 steps: the generator evaluated is that of the last few dozen. Evaluated at step 0 and the end.
SETTINGS = ["objective.name=sid", "objective.fake_score_weighting=edm", "objective.sigma_data=1.0",
            "optim.lr_generator=1e-4", "optim.lr_fake_score=3e-4", "train.batch_size=32",
            f"train.total_nimg={32 * ITERATIONS}", "train.ema_halflife_nimg=500", "train.ema_rampup=0.0",
            f"train.eval_every={ITERATIONS}", "eval.num_samples=300", "eval.teacher_sampler_steps=10",
            "data.source=vocab", "train.progress=false", "train.log_every=0", "train.sample_every=0",
            "train.checkpoint_every=0", "train.seed=0"]
# The control is a generator that does not learn (learning rate 0): evaluated twice with the same weights, the
# same noise and the same reference, its FD does not move, a ratio of exactly 1. The estimate's own sampling error at
# this size is of the order of the noise floor (the FD of two exact sample sets: what a generator at the truth reads).
# Asserted: the start at least 2 FALL floors from the truth, and a fall to fd_init / FALL, so by at least
# 2 (FALL - 1) = 6 floors, which no draw of the estimate makes; FALL = 4: three quarters of the start's distance gone.
FALL = 4


# SDXL, the slowest here (its UNet as SD's with added conditioning and two encoders, each tested in test_families
# and test_export_families), is distilled at benchmark size only (benchmarks/results/families_sdxl.json), which
# keeps the suite's time in bounds.
@pytest.mark.parametrize("family", ["sd", "pixart", "sd3"])
def test_distilling_a_fitted_teacher_brings_the_one_step_fd_down_by_a_clear_factor(family, tmp_path):
    """One test per family, so that pytest-xdist fits each teacher once (a module fixture shared by two tests can be
    built on both workers)."""
    teacher = prepare_family_teacher(tmp_path / "teacher", GMM, family, FIT_STEPS, fit_lr=FIT_LR)
    final = Trainer(load_config(None, [*SETTINGS, *teacher, f"train.run_dir={tmp_path / 'run'}"])).run()
    (_, fd_init), (_, fd_final) = fd_history(tmp_path / "run")
    floor = final["fd_reference"]
    report = (f"{family}: one-step FD {fd_init:.3f} -> {fd_final:.3f}; teacher's sampler "
              f"{final['fd_teacher_sampler']:.3f}, exact denoiser's {final['fd_exact_sampler']:.3f}, "
              f"noise floor {floor:.3f}")
    # the fall is toward a teacher that is a fit of the truth, not merely toward a teacher
    assert final["teacher_fit_ok"], report
    assert fd_init >= 2 * FALL * floor, report
    assert fd_final <= fd_init / FALL, report
