"""The diffusers teacher path on a tiny Stable Diffusion pipeline saved to disk and loaded back."""

import json
import logging

import pytest
import torch

from bigsid.cli import main
from bigsid.config import ConfigError, GMMConfig, load_config
from bigsid.families import FAMILIES, TeacherError, UNetDenoiser, load_teacher
from bigsid.models import build_networks, predict
from bigsid.parallel.local import LocalBackend
from bigsid.text import CLIPPromptEncoder, Cond
from bigsid.toy import GMM, build_toy_pipeline, fit_denoiser
from bigsid.trainer import Trainer
from conftest import TINY_TOY, TOY_TEACHER_GMM

GMM_CFG = GMMConfig(**TOY_TEACHER_GMM)


def overrides(teacher_dir, run_dir, *extra):
    return [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher_dir}", f"train.run_dir={run_dir}",
            "train.batch_size=4", "train.total_nimg=8", "eval.num_samples=16", *extra]


def test_teacher_loads_with_from_pretrained_and_keeps_its_truth(teacher_dir):
    teacher = load_teacher(str(teacher_dir))
    assert teacher.family is FAMILIES["sd"]
    assert isinstance(teacher.denoiser, UNetDenoiser) and teacher.denoiser.prediction_type == "epsilon"
    assert teacher.scheduler_config["beta_schedule"] == "scaled_linear"
    assert teacher.encoder(["a"]).uncond.emb.shape == (1, teacher.encoder.max_length, 32)
    cfg = load_config(None, overrides(teacher_dir, "unused"))
    nets = build_networks(cfg)
    assert nets.latent_shape == (4, 4, 4) and nets.vocabulary == ["toy prompt 0", "toy prompt 1"]
    assert nets.generator.net is not nets.teacher and nets.fake_score is not nets.teacher
    # built empty, filled by the backend as it places them
    assert all(p.is_meta for net in (nets.generator, nets.fake_score) for p in net.parameters())
    LocalBackend(cfg).place(nets)
    for net in (nets.fake_score, nets.generator.net):
        for a, b in zip(nets.teacher.parameters(), net.parameters(), strict=True):
            assert torch.equal(a, b) and not a.requires_grad and b.requires_grad


def test_distillation_steps_run_on_the_diffusers_path_in_bf16(teacher_dir, tmp_path):
    tr = Trainer(load_config(None, overrides(teacher_dir, tmp_path, "train.precision=bf16", "objective.kappa4=2",
                                              "objective.kappa2=2", "objective.kappa3=2", "objective.kappa1=2")))
    # the frozen teacher is stored in the compute dtype; the trained networks keep fp32 master weights
    assert {p.dtype for p in tr.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tr.generator.inner.parameters()} == {torch.float32}
    result = tr.run()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["generator/loss"])) for r in rows if "generator/loss" in r)
    assert {"fd_generator", "fd_teacher_sampler", "mode_coverage_tv"} <= set(result)


def test_v_prediction_teacher(teacher_dir, tmp_path):
    teacher = load_teacher(str(teacher_dir), prediction_type="v_prediction")
    unet, schedule = teacher.denoiser, teacher.schedule
    assert unet.prediction_type == "v_prediction" == schedule.prediction_type
    x_t, t, emb = torch.randn(2, 4, 4, 4), torch.tensor([100, 900]), torch.randn(2, 32, 32)
    cond = Cond(emb, uncond=Cond(emb[:1]))

    with torch.no_grad():
        raw = unet(x_t, t, cond)
        x0 = predict(unet, schedule, x_t, t, cond)
    a, s = schedule.coeffs(t, 4)
    torch.testing.assert_close(x0, a * x_t - s * raw)


def test_fitting_to_the_truth_lowers_the_teacher_error():
    truth = GMM.from_config(GMM_CFG)
    pipe = build_toy_pipeline(truth)
    from bigsid.diffusion import SD_SCHEDULER_CONFIG, VPSchedule

    schedule = VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG)
    encoder = CLIPPromptEncoder(pipe.tokenizer, pipe.text_encoder)
    net = UNetDenoiser(pipe.unet, "epsilon")
    first = fit_denoiser(net, encoder, truth, schedule, steps=1, batch=64, seed=1)
    later = fit_denoiser(net, encoder, truth, schedule, steps=30, batch=64, seed=2)
    assert later < 0.5 * first


def test_long_prompts_are_truncated_and_said_once(teacher_dir, caplog):
    encoder = load_teacher(str(teacher_dir)).encoder
    long = "a very long prompt " * 20
    with caplog.at_level(logging.WARNING, logger="bigsid.text"):
        a = encoder([long, "x"])
        encoder([long])
    assert a.emb.shape == (2, encoder.max_length, 32)
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_bad_teacher_folders_are_refused_clearly(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no such folder"):
        load_config(None, ["teacher.kind=diffusers", f"teacher.path={tmp_path / 'missing'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="model_index.json"):
        load_teacher(str(tmp_path / "empty"))
    assert main(["train", "-", "teacher.kind=diffusers", f"teacher.path={tmp_path / 'missing'}"]) == 2
    assert "teacher.path" in capsys.readouterr().err


def test_cli_refuses_bad_config_with_exit_2_and_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("objective:\n  alpah: 1.2\n")
    assert main(["train", str(cfg)]) == 2
    assert "objective.alpah" in capsys.readouterr().err
    assert main(["train", str(cfg).replace("c.yaml", "none.yaml")]) == 2
    for bad, key in (("objective.alpha=abc", "objective.alpha"), ("train.batch_size=0", "train.batch_size"),
                     ("objective.name=foo", "objective.name"), ("objective.t_max=1500", "t_max"),
                     ("teacher.gmm.latent_shape=[4,4]", "latent_shape"),
                     ("objective.fake_score_weighting=karras", "objective.fake_score_weighting"),
                     ("objective.sigma_data=0", "objective.sigma_data")):
        assert main(["train", "-", bad]) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_lora_generator_trains_only_its_adapter(teacher_dir, tmp_path):
    pytest.importorskip("peft")
    tr = Trainer(load_config(None, overrides(teacher_dir, tmp_path, "generator.lora_rank=4")))
    unet = tr.generator.inner.net.unet
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    tr.run()
    moved = {n for n, p in unet.named_parameters() if not torch.equal(before[n], p)}
    assert moved and moved <= trained
    assert {n for n in tr.ema.names} == {f"net.unet.{n}" for n in trained}


@pytest.mark.parametrize("checkpointed", [True, False])
def test_the_frozen_teacher_recomputes_its_activations_when_checkpointed(teacher_dir, tmp_path, checkpointed):
    """The frozen teacher runs in eval mode; diffusers before 0.32 skipped gradient checkpointing there, so its
    activations were silently kept. Checkpointed, each of its blocks runs again in the backward pass."""
    tr = Trainer(load_config(None, overrides(teacher_dir, tmp_path, "train.activation_checkpointing="
                                             + ("[teacher]" if checkpointed else "[]"))))
    assert not tr.teacher.training
    block = tr.teacher.unet.down_blocks[0].resnets[0]
    calls, forward = [], block.forward

    def counted(*args, **kwargs):  # not a forward hook: torch's checkpoint runs none while it recomputes
        calls.append(1)
        return forward(*args, **kwargs)

    block.forward = counted
    tr.generator_phase()
    # one teacher call per generator step (conditional and unconditional batched), plus its recomputation
    assert len(calls) == (2 if checkpointed else 1)
