"""Teacher families on tiny random pipelines saved to disk: detection, conditioning as the stock pipeline encodes
it, the objectives' fixed point on every family (flow included), training steps, bad input."""

import copy
import json
import logging

import pytest
import torch

from bigsid.config import ObjectiveConfig, load_config
from bigsid.families import FAMILIES, TeacherError, load_teacher
from bigsid.models import build_networks
from bigsid.objectives import build_objective
from bigsid.tiny import build_pipeline
from bigsid.trainer import Trainer
from conftest import TINY_TOY
from test_parallel import assert_same_loss, launch, losses

PROMPTS = ["a red cube", "two cats on a sofa", ""]
# bigsid.tiny's pipelines (`pixart` is PixArt-Sigma's) and PixArt-alpha's at 128 latents, the size of its 1024 px
# model, whose transformer takes resolution and aspect-ratio conditioning: the tiny pipeline each name builds
TINY = {"pixart_alpha_1024": ("pixart_alpha", (4, 128, 128))}


def save_tiny(name, folder):
    pipeline, latent_shape = TINY.get(name, (name, (4, 8, 8)))
    build_pipeline(pipeline, latent_shape).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["sdxl", "pixart", "sd3"])
def family_dir(request, tmp_path_factory):
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "pipe")


def stock_micro_conditions(transformer, call) -> list:
    """The resolution and aspect ratio (added_cond_kwargs) each call of PixArt's `transformer` gets in `call()`."""
    passed = []
    hook = transformer.register_forward_hook(
        lambda module, args, kwargs, out: passed.append(kwargs["added_cond_kwargs"]), with_kwargs=True)
    try:
        call()
    finally:
        hook.remove()
    return passed


@torch.no_grad()
@pytest.mark.parametrize("family_dir", ["sdxl", "pixart", "pixart_alpha", "pixart_alpha_1024", "sd3"],
                         indirect=True)
def test_conditioning_is_what_the_stock_pipeline_encodes(family_dir):
    """Bit for bit: the same tokenizers, layers, padding and empty prompt as the family's own encode_prompt, and
    PixArt's resolution and aspect-ratio conditioning as its pipeline passes it."""
    from diffusers import DiffusionPipeline

    name, folder = family_dir
    teacher = load_teacher(str(folder))
    family = teacher.family.name
    assert family == name.partition("_")[0]
    pipe = DiffusionPipeline.from_pretrained(folder)
    cond = teacher.encoder(PROMPTS)
    if family == "sdxl":
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=None)
        size = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), emb.dtype,
                                      pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(cond.size, size.expand(len(PROMPTS), -1))
        # force_zeros_for_empty_prompt: the stock negative is zeros, not the encoded ""
        assert not neg.any() and not cond.uncond.emb.any() and not cond.uncond.pooled.any()
    elif family == "pixart":
        # at the stock T5 length, PixArt-alpha's 120 tokens or Sigma's 300
        emb, mask, _, _ = pipe.encode_prompt(PROMPTS, device="cpu")
        _, _, neg, neg_mask = pipe.encode_prompt([""], device="cpu")
        assert emb.shape[1] == (120 if name.startswith("pixart_alpha") else 300)
        assert torch.equal(cond.mask, mask) and torch.equal(cond.uncond.mask, neg_mask)
        assert torch.equal(cond.uncond.emb, neg)
        assert cond.mask.sum(1).tolist()[:2] == [len(p) + 2 for p in PROMPTS[:2]]  # one piece a char, "▁", </s>
        pixels = 8 * pipe.transformer.config.sample_size
        assert cond.size.tolist() == [[pixels, pixels, 1.0]] * len(PROMPTS)
        # The stock call at its default size without guidance (two steps: PixArtAlphaPipeline's single step reads
        # an x0 that its DPM-Solver does not return) and bigsid's denoiser pass the transformer the same
        # micro-conditions: (height, width) and height / width where it takes them (PixArt-alpha at 1024 px), none
        # elsewhere.
        x_t = torch.zeros(len(PROMPTS), *teacher.latent_shape)
        stock = stock_micro_conditions(pipe.transformer, lambda: pipe(
            PROMPTS, num_inference_steps=2, guidance_scale=1, use_resolution_binning=False, latents=x_t,
            output_type="latent"))
        ours = stock_micro_conditions(teacher.denoiser.transformer,
                                      lambda: teacher.denoiser(x_t, torch.tensor([999] * len(PROMPTS)), cond))[0]
        assert len(stock) == 2 and ours.keys() == {"resolution", "aspect_ratio"}
        for passed in stock:
            assert passed.keys() == ours.keys()
            assert all(torch.equal(passed[k], ours[k]) if ours[k] is not None else passed[k] is None for k in ours)
        assert (ours["resolution"] is not None) == (name == "pixart_alpha_1024")
    else:
        emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu")
        # the empty prompt is encoded once, alone: compared with the stock encoding of a batch of one
        _, neg, _, neg_pooled = pipe.encode_prompt([""], [""], [""], device="cpu")
        assert torch.equal(cond.uncond.emb, neg) and torch.equal(cond.uncond.pooled, neg_pooled)
    assert torch.equal(cond.emb, emb)
    if cond.pooled is not None:
        assert torch.equal(cond.pooled, pooled)


@pytest.mark.parametrize("objective", ["sid", "sim", "dmd"])
def test_fixed_point_on_every_family(family_dir, objective):
    """A fake score equal to the teacher gives the generator no gradient, guided or not, on VP and flow alike; a
    fake score that differs gives one. In float64: teacher and fake score run the same operations, so their
    contributions to the input gradient are equal and opposite bit for bit, and only their accumulation rounds (a few
    additions of terms no larger than one network's contribution T, each within 2^-53): 1e-9 |T| leaves a margin
    of 10^6 for the guided halves of T cancelling each other. DMD does not differentiate through the networks, so its
    gradient (f_psi - f_phi) w is exactly 0."""
    from bigsid.models import predict

    _, folder = family_dir
    teacher = load_teacher(str(folder))
    net, schedule = teacher.denoiser.requires_grad_(False).double(), teacher.schedule
    cfg = ObjectiveConfig(name=objective, kappa2=2.0, kappa3=2.0, kappa4=2.0)
    obj = build_objective(cfg, schedule)
    gen = torch.Generator().manual_seed(0)
    x_gen = torch.randn(3, *teacher.latent_shape, generator=gen, dtype=torch.float64).requires_grad_(True)
    eps = torch.randn(x_gen.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([30, 500, 970])
    cond = teacher.encoder(PROMPTS).to(torch.float64)

    def grad(fake_score):
        loss, _ = obj.generator_loss(net, fake_score, x_gen, cond, t, eps)
        return torch.autograd.grad(loss.sum(), x_gen)[0]

    f_phi = predict(net, schedule, schedule.add_noise(x_gen, eps, t), t, cond, 2.0)
    one_side = torch.autograd.grad((f_phi * (f_phi - x_gen).detach()).sum(), x_gen)[0]
    residual = grad(copy.deepcopy(net))
    bound = 0.0 if objective == "dmd" else 1e-9 * one_side.norm()
    assert residual.norm() <= bound and one_side.norm() > 0
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    assert grad(other).norm() > 1e-3 * one_side.norm()


def overrides(name, folder, tmp_path, *extra, prompts=("a red cube",) * 2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("".join(p + "\n" for p in prompts))
    return [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={folder}", f"train.run_dir={tmp_path / 'run'}",
            "data.source=text", f"data.path={prompts_file}", "train.batch_size=4", "train.total_nimg=8",
            "train.log_every=1", "train.checkpoint_every=0", *(f"objective.kappa{i}=1.5" for i in range(1, 5)),
            f"generator.t_init={999 if name == 'sd3' else 625}", *extra]


@pytest.mark.parametrize("family_dir", ["sdxl", "pixart", "pixart_alpha_1024", "sd3"], indirect=True)
def test_training_steps_run_on_every_family(family_dir, tmp_path):
    name, folder = family_dir
    tr = Trainer(load_config(None, overrides(name, folder, tmp_path, prompts=PROMPTS[:2])))
    before = {k: v.clone() for k, v in tr.generator.module.state_dict().items()}
    tr.run()
    assert losses(tmp_path / "run").isfinite().all()
    after = tr.generator.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_teacher_built_empty_and_filled_is_what_from_pretrained_loads(family_dir, tmp_path):
    """A bf16 run's teacher, built on the meta device and filled by the backend from the fp32 weights, holds what
    from_pretrained(torch_dtype=bf16) loads, bit for bit and dtype for dtype, buffers included (PixArt's position
    embedding, computed rather than read, stays fp32; SD3's, read from the file, is bf16)."""
    from bigsid.families import load_network
    from bigsid.parallel.local import LocalBackend

    name, folder = family_dir
    cfg = load_config(None, overrides(name, folder, tmp_path, "train.precision=bf16"))
    networks = build_networks(cfg)
    assert all(p.is_meta for p in networks.teacher.parameters())
    LocalBackend(cfg).place(networks)
    family = FAMILIES[name]
    reference = family.denoiser(load_network(family, str(folder), torch_dtype=torch.bfloat16), "epsilon")
    expected = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    held = {**dict(networks.teacher.named_parameters()), **dict(networks.teacher.named_buffers())}
    assert held.keys() == expected.keys()
    assert {str(t.dtype) for t in held.values()} >= {"torch.bfloat16"}
    for key, t in expected.items():
        assert held[key].dtype == t.dtype and torch.equal(held[key], t), key


def test_fsdp2_shards_every_family_by_its_plan_and_matches_one_process(family_dir, tmp_path):
    """Each family's blocks become FSDP2 units (none left to a whole-network unit), and 2 gloo ranks give the
    one-process losses (tests/test_parallel.py argues the tolerance; one prompt, as there, so that the prompt
    streams of both layouts agree)."""
    from bigsid.parallel.fsdp2 import units

    name, folder = family_dir
    teacher = load_teacher(str(folder)).denoiser
    plan = units(teacher)
    assert plan and all(sum(p.numel() for p in u.parameters()) for u in plan)
    covered = {id(p): p.numel() for u in plan for p in u.parameters()}
    total = sum(p.numel() for p in teacher.parameters())
    assert sum(covered.values()) > total / 2, "the root unit keeps most of the network"
    Trainer(load_config(None, overrides(name, folder, tmp_path / "local"))).run()
    launch(2, overrides(name, folder, tmp_path / "fsdp2", "parallel.backend=fsdp2"))
    expected = losses(tmp_path / "local" / "run")
    assert expected.shape == (2, 2)
    assert_same_loss(losses(tmp_path / "fsdp2" / "run"), expected)


def test_long_prompts_are_truncated_to_t5s_limit_and_said_once(tmp_path, caplog):
    folder = tmp_path / "pixart"
    build_pipeline("pixart").save_pretrained(folder)
    teacher = load_teacher(str(folder), text_max_length=16)
    with caplog.at_level(logging.WARNING, logger="bigsid.text"):
        cond = teacher.encoder(["x" * 40, "short"])
        teacher.encoder(["y" * 40])
    assert cond.emb.shape[1] == 16 and cond.mask[0].all()
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_bad_teachers_are_refused_before_any_long_work(tmp_path, teacher_dir):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(TeacherError, match="KandinskyPipeline.*supported pipelines are StableDiffusionPipeline"):
        load_teacher(str(odd))
    with pytest.raises(TeacherError, match="text_max_length=77 applies to T5 encoders"):
        load_teacher(str(teacher_dir), text_max_length=77)
    folder = tmp_path / "sd3"
    build_pipeline("sd3").save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"text_encoder_3": [None, None]}))
    with pytest.raises(TeacherError, match="no text encoder text_encoder_3"):
        load_teacher(str(folder))
    # model_index.json chooses classes, never modules to import
    (folder / "model_index.json").write_text(json.dumps(index | {"text_encoder_3": ["antigravity", "T5"]}))
    with pytest.raises(TeacherError, match="names antigravity.T5 .* transformers or diffusers classes only"):
        load_teacher(str(folder))
    pixart = tmp_path / "pixart"
    build_pipeline("pixart").save_pretrained(pixart)
    with pytest.raises(TeacherError, match="PixArtTransformer2DModel takes no LoRA adapter"):
        build_networks(load_config(None, ["teacher.kind=diffusers", f"teacher.path={pixart}", "fake_score.lora_rank=4"]))


def test_fake_score_as_a_lora_adapter_on_the_teacher(teacher_dir, tmp_path):
    """fake_score.lora_rank: one network's weights fewer; the teacher is the shared network with the adapter off,
    unchanged by training, while the adapter (and nothing else) learns."""
    pytest.importorskip("peft")
    from bigsid.text import Cond

    args = [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher_dir}", "train.batch_size=4",
            "train.total_nimg=8", "train.checkpoint_every=0", "eval.num_samples=16"]
    full = Trainer(load_config(None, [*args, f"train.run_dir={tmp_path / 'full'}"]))
    tr = Trainer(load_config(None, [*args, f"train.run_dir={tmp_path / 'lora'}", "fake_score.lora_rank=4"]))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(tr.teacher) == 0
    adapter = sum(p.numel() for p in tr.fake_score.module.parameters() if p.requires_grad)
    assert 0 < adapter < count(full.teacher) / 10
    assert count(tr.fake_score.module) == count(full.fake_score.module) + adapter  # the copy is gone
    gen = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([100, 800])
    cond = Cond(torch.randn(2, 32, 32, generator=gen))
    with torch.no_grad():
        before = tr.teacher(x_t, t, cond)
        assert torch.equal(before, full.teacher.float()(x_t, t, cond))
        weights = {k: v.clone() for k, v in tr.fake_score.module.state_dict().items()}
    tr.run()
    with torch.no_grad():
        after = tr.teacher(x_t, t, cond)
        fake = tr.fake_score.module(x_t, t, cond)
    assert torch.equal(before, after), "the teacher must not learn"
    moved = {k for k, v in tr.fake_score.module.state_dict().items() if not torch.equal(weights[k], v)}
    assert moved and all("lora" in k for k in moved)
    assert not torch.equal(fake, after), "the fake score learned through its adapter"


def test_the_generator_phase_leaves_a_lora_fake_score_frozen(teacher_dir, tmp_path):
    """The generator's loss calls the teacher (the fake score's network with its adapter switched off) and then the
    fake score, both frozen: peft's switch back on must not make the adapter trainable again, or the generator's
    backward leaves its loss's gradients on the adapter, to be added into the fake score's next update (and, under
    ZeRO-3, queued twice into one gradient reduction)."""
    pytest.importorskip("peft")
    tr = Trainer(load_config(None, [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher_dir}",
                                    "train.batch_size=4", f"train.run_dir={tmp_path}", "fake_score.lora_rank=4"]))
    adapter = tr.fake_score.params
    assert adapter and all("lora" in n for n, p in tr.fake_score.module.named_parameters() if p.requires_grad)
    tr.fake_score_phase()
    assert all(p.grad is None for p in adapter)  # the step consumed them
    metrics = tr.generator_phase()
    assert metrics["generator/grad_norm"] > 0  # the generator's backward ran, through both networks' inputs
    assert [n for n, p in tr.fake_score.module.named_parameters() if p.grad is not None] == []
    assert all(p.requires_grad for p in adapter)  # trainable again once its own phase comes


def empty_denoiser_state(family, folder) -> dict:
    """What a denoiser built empty from `folder` needs from its files: its tensors still on meta."""
    from bigsid.families import load_network

    net = family.denoiser(load_network(family, str(folder), weights=False), "epsilon")
    return {name: t for name, t in net.state_dict(keep_vars=True).items() if t.is_meta}


def cache_as_hub_snapshot(folder, cache, monkeypatch) -> str:
    """Moves a pipeline folder into a hub cache as the snapshot of repository org/tiny; returns its id."""
    import huggingface_hub.constants

    commit = "0" * 40
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    folder.rename(repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return "org/tiny"


@pytest.mark.parametrize("layout", ["one file", "index", "hub"])
def test_stored_weights_are_what_from_pretrained_loads(tmp_path, monkeypatch, layout):
    """Every tensor a denoiser built empty starts from, read from the teacher's safetensors (one file, shards listed
    by an index, or a hub id's cached snapshot) whole, by rows, and cast, is what from_pretrained loads, bit for
    bit: what FSDP2's ranks read their shards from."""
    from bigsid.families import WEIGHTS, load_network, stored_weights

    family = FAMILIES["sd3"]
    folder = tmp_path / "pipe"
    build_pipeline("sd3").save_pretrained(folder)
    reference = family.denoiser(load_network(family, str(folder)), "epsilon").state_dict()
    expected = empty_denoiser_state(family, folder)
    path = str(folder)
    if layout == "index":
        network = load_network(family, str(folder))
        for file in (folder / "transformer").glob("*.safetensors"):
            file.unlink()
        network.save_pretrained(folder / "transformer", max_shard_size="20KB")
        assert (folder / "transformer" / f"{WEIGHTS}.index.json").is_file()
        assert len(list((folder / "transformer").glob("*.safetensors"))) > 2
    elif layout == "hub":
        path = cache_as_hub_snapshot(folder, tmp_path / "hub", monkeypatch)
    stored = stored_weights(family, path, "", expected)
    assert stored is not None and expected.keys() <= stored.keys()
    assert "transformer.pos_embed.pos_embed" in expected, "a buffer read from the file is read so too"
    for name in expected:
        whole = stored[name].read()
        assert whole.dtype == reference[name].dtype and torch.equal(whole, reference[name]), name
        assert torch.equal(stored[name].to(torch.bfloat16).read(), reference[name].to(torch.bfloat16)), name
        if whole.dim():
            n = len(whole)
            assert torch.equal(stored[name].read(n // 3, n - 1), reference[name][n // 3:n - 1]), name


def test_stored_weights_step_aside_where_from_pretrained_must_read(tmp_path, caplog):
    """Weights in .bin files, a tensor the files lack or hold in another shape (names from_pretrained would convert),
    a hub id not in the cache: None, with the reason in the log, so that from_pretrained reads the weights whole and
    says what is wrong where it cannot."""
    from bigsid.families import load_network, stored_weights

    family = FAMILIES["sd3"]
    folder = tmp_path / "pipe"
    build_pipeline("sd3").save_pretrained(folder)
    expected = empty_denoiser_state(family, folder)
    assert stored_weights(family, str(folder), "", expected) is not None
    name, t = next(iter(expected.items()))
    with caplog.at_level(logging.INFO, logger="bigsid.families"):
        assert stored_weights(family, str(folder), "", {**expected, "transformer.extra": t}) is None
        assert "transformer.extra" in caplog.text
        reshaped = {**expected, name: torch.empty(t.numel() + 1, device="meta")}
        assert stored_weights(family, str(folder), "", reshaped) is None
        assert stored_weights(family, "org/absent", "", expected) is None
        assert "org/absent" in caplog.text
        network = load_network(family, str(folder))
        for file in (folder / "transformer").glob("*.safetensors"):
            file.unlink()
        network.save_pretrained(folder / "transformer", safe_serialization=False)
        assert stored_weights(family, str(folder), "", expected) is None
