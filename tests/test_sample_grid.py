"""Sample grids of a teacher without an analytic truth: VAE-decoded on rank 0, in bf16 under train.precision=bf16."""

import shutil

import pytest
import torch

from bigsid.config import load_config
from bigsid.trainer import Trainer
from conftest import TINY_TOY


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_grid_is_decoded_in_the_training_compute_dtype(teacher_dir, tmp_path, precision, dtype):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    (teacher / "bigsid_toy.json").unlink()  # no truth: the grid goes through the VAE
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    trainer = Trainer(load_config(None, [
        *TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher}", "data.source=text", f"data.path={prompts}",
        "eval.sample_prompts=[a cat,a dog]", "eval.sample_seeds=2", "train.batch_size=4", "train.device=cpu",
        f"train.precision={precision}", f"train.run_dir={tmp_path / 'run'}"]))
    decoded = []
    vae = trainer.networks.vae
    vae.decoder.conv_out.register_forward_hook(lambda module, args, out: decoded.append(out.dtype))
    path = trainer.save_samples()
    assert decoded == [dtype]  # one chunk of 4 latents, computed in the training dtype
    assert vae.dtype == torch.float32  # the VAE itself stays fp32: autocast computes in bf16
    assert path.is_file()
