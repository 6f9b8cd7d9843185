import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


TINY_TOY = ["teacher.student_width=64", "teacher.student_depth=2", "teacher.student_fit_steps=200",
            "train.batch_size=32", "train.total_nimg=320", "train.progress=false", "train.log_every=2",
            "train.sample_every=0", "train.checkpoint_every=5", "train.eval_every=0", "eval.num_samples=200",
            "eval.teacher_sampler_steps=5", "optim.lr_generator=1e-4", "optim.lr_fake_score=1e-4",
            "train.ema_halflife_nimg=500"]
