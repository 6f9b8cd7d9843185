import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# two pytest-xdist workers share the two cores of the CI machines: one thread each, else two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


TINY_TOY = ["teacher.student_width=64", "teacher.student_depth=2", "teacher.student_fit_steps=200",
            "train.batch_size=32", "train.total_nimg=320", "train.progress=false", "train.log_every=2",
            "train.sample_every=0", "train.checkpoint_every=5", "train.eval_every=0", "eval.num_samples=200",
            "eval.teacher_sampler_steps=5", "optim.lr_generator=1e-4", "optim.lr_fake_score=1e-4",
            "train.ema_halflife_nimg=500"]


# Parity of training runs, judged on their updates d = w - w0 (a weight itself is mostly w0, so comparing weights
# lets a run that never stepped pass). Adam with beta1 = 0 (the optim defaults) moves a weight at step t by
# lr g_t / sqrt(v_t), and v_t >= (1 - beta2) g_t^2 / (1 - beta2^t) caps that at lr sqrt(t) for t << 1/(1 - beta2):
# after T steps |d| <= lr S_T, S_T = sum_t sqrt(t) (2.41 lr for T = 2). A weight whose gradient is not ~0 moves by
# ~lr per step, so a run that trained has rms(d) >= lr / 2 unless most gradients reversed from step to step.
# Two backends compute the same gradients up to the order of their fp32 sums (per-rank batch slices, all-reduce):
# a gradient of n terms moves by ~sqrt(n) u sum|terms| (u = 2^-24), while gradients spread over ~sum|terms| /
# sqrt(n) around zero. Adam's normalisation keeps that a ~1e-6 relative change of each update, except for the
# fraction ~n u of weights whose gradient lies within rounding of zero: their update may reverse, changing d by up
# to 2 lr S_T. With n <= 10^3 terms here, at most FLIP_FRACTION of the N weights do so (at least one is allowed):
# |d_a - d_b| <= 2 lr S_T sqrt(FLIP_FRACTION N), against |d_b| >= lr sqrt(N) / 2 for a run that trained, so a run
# that never stepped (|d_a - d_b| = |d_b|) fails wherever the bound is well below |d_b|, as asserted.
FLIP_FRACTION = 1e-4


def assert_same_update(trained: dict, reference: dict, initial: dict, lr: float, steps: int) -> None:
    """`trained` and `reference` (state dicts) took the same `steps` Adam steps at `lr` from `initial`."""
    assert trained.keys() == reference.keys() and reference.keys() <= initial.keys()
    d_a, d_b = ([(s[k].double() - initial[k].double()).flatten() for k in reference] for s in (trained, reference))
    d_a, d_b = torch.cat(d_a), torch.cat(d_b)
    count = d_b.numel()
    bound = 2 * lr * sum(t ** 0.5 for t in range(1, steps + 1)) * max(FLIP_FRACTION * count, 1) ** 0.5
    size, err = d_b.norm().item(), (d_a - d_b).norm().item()
    assert size >= lr * count ** 0.5 / 2, f"the reference hardly moved: rms update {size / count ** 0.5:.3g}, lr {lr}"
    assert bound <= size / 4, "the bound cannot tell a run that never stepped (error = |d|) from one that did"
    assert err <= bound, f"|d - d_ref| = {err:.4g} > {bound:.4g} (|d_ref| = {size:.4g}, {count} weights)"


# The tiny diffusers Stable Diffusion teacher fitted (5 steps) to a 2 prompts x 2 modes GMM in a 4x4x4 latent:
# seeded, so every test module would build the same one; built once per session and only read.
TOY_TEACHER_GMM = dict(num_prompts=2, modes_per_prompt=2, latent_shape=[4, 4, 4])


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    from bigsid.config import GMMConfig
    from bigsid.toy import prepare_toy_teacher

    return prepare_toy_teacher(tmp_path_factory.mktemp("t") / "teacher", GMMConfig(**TOY_TEACHER_GMM), fit_steps=5)
