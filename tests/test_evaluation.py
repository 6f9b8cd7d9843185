"""The evaluation package on tiny random-weight stand-ins of the real networks: a scripted Inception-shaped network,
transformers CLIP models built from tiny configs, a LAION aesthetic head of the published shape. CPU, no downloads.

Where values are compared across runs they are computed by the same code on the same images and must be equal; the
Frechet tolerance is argued where it is used."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluation  # noqa: F401  (first: makes torchvision importable where its operators are not)
from bigsid.cli import main
from bigsid.tiny import byte_level_clip_tokenizer
from bigsid.toy import frechet_from_stats
from conftest import TINY_TOY
from evaluation import clip, fid, generate
from evaluation.settings import EvalError

FEATURES = 16  # the stand-in Inception's feature width


class TinyInception(torch.nn.Module):
    """clean-fid's TorchScript interface: `layers` maps (x - 128) / 128 at 299 px to pool features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, FEATURES, 7, stride=8), torch.nn.Tanh(),
                                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128) / 128)


def tiny_clip(folder: Path, projection: int) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(1)
    # The byte-level tokenizer's <|startoftext|> and <|endoftext|> are ids 512 and 513; CLIP pools the text at the
    # first end-of-text token, so the config must name it (the default id would pool the start token alone).
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=515, max_position_embeddings=32,
                                         bos_token_id=512, eos_token_id=513, pad_token_id=513),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8),
                        projection_dim=projection)
    CLIPModel(config).save_pretrained(folder)
    byte_level_clip_tokenizer(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Weights files and a reference image folder, as a user stages them."""
    root = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    torch.jit.script(TinyInception()).save(str(root / "inception.pt"))
    torch.save(clip.AestheticHead().state_dict(), root / "head.pth")
    refs = root / "real"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)).save(refs / f"{i:02d}.png")
    (refs / "notes.txt").write_text("not an image")
    (refs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {"inception": root / "inception.pt", "head": root / "head.pth", "real": refs,
            "clip": tiny_clip(root / "clip", 24), "clip_l14": tiny_clip(root / "clip_l14", 768),
            "stats": root / "stats.npz"}


def metric_args(nets, *extra):
    return ["metrics=[fid,clip,aesthetic]", f"fid.inception={nets['inception']}", f"fid.reference={nets['real']}",
            f"fid.reference_stats={nets['stats']}", "clip.backend=transformers", f"clip.weights={nets['clip']}",
            "aesthetic.backend=transformers", f"aesthetic.weights={nets['clip_l14']}", f"aesthetic.head={nets['head']}",
            "num_images=6", "batch_size=4", *extra]


@pytest.fixture(scope="module")
def run_dir(teacher_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "-", *TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher_dir}",
                 f"train.run_dir={run}", "train.batch_size=4", "train.total_nimg=8", "eval.num_samples=16",
                 "train.ema_rampup=0"]) == 0
    return run


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def evaluated(run_dir, nets):
    """One uninterrupted evaluation; the run's files before and after it."""
    before = snapshot(run_dir)
    assert main(["eval", str(run_dir), *metric_args(nets, "name=full")]) == 0
    return run_dir / "eval" / "full", before


def values(folder: Path) -> dict:
    return {k: v["value"] for k, v in json.loads((folder / "metrics.json").read_text())["metrics"].items()}


# ---- the Frechet distance and the clean-fid protocol ----

def _psd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _sym_sqrt(c):
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_is_the_gaussians_closed_form():
    """tr((C1 C2)^1/2) = tr((C1^1/2 C2 C1^1/2)^1/2), the latter from symmetric eigendecompositions only. In float64
    on 8 x 8 matrices with eigenvalues >= 0.1 both sides agree to ~1e-12; 1e-8 leaves room and still catches any
    wrong term (each is O(1))."""
    rng = np.random.default_rng(0)
    mu1, mu2, c1, c2 = rng.standard_normal(8), rng.standard_normal(8), _psd(rng, 8), _psd(rng, 8)
    r = _sym_sqrt(c1)
    closed = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(_sym_sqrt(r @ c2 @ r))
    assert frechet_from_stats(mu1, c1, mu2, c2) == pytest.approx(closed, abs=1e-8)
    assert frechet_from_stats(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_matches_clean_fid():
    cleanfid = pytest.importorskip("cleanfid.fid")
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((200, 16)), rng.standard_normal((300, 16)) * 1.3 + 0.2
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (x, y)]
    assert frechet_from_stats(*stats[0], *stats[1]) == pytest.approx(
        cleanfid.frechet_distance(*stats[0], *stats[1]), rel=1e-10)


def test_resize_is_a_centred_long_edge_crop_then_lanczos():
    """A 60 x 40 image with 10-px red margins left and right: the crop keeps the 40 x 40 centre, so no red remains;
    a uniform colour stays that colour through Lanczos and through the 299-px bicubic resize."""
    x = np.zeros((40, 60, 3), np.uint8)
    x[:, :10] = x[:, 50:] = (255, 0, 0)
    x[:, 10:50] = (10, 200, 30)
    out = np.asarray(fid.crop_resize(Image.fromarray(x), 256))
    assert out.shape == (256, 256, 3) and (out == (10, 200, 30)).all()
    big = fid.inception_input(Image.fromarray(out))
    assert big.shape == (3, 299, 299) and big.dtype == np.float32
    assert np.allclose(big, np.array([10, 200, 30], np.float32)[:, None, None], atol=1e-3)


@pytest.mark.parametrize("width,left", [(45, 2), (46, 3), (47, 4)])
def test_the_crop_offset_is_rounded_as_torchvision_rounds_it(width, left):
    """torchvision's center_crop (GigaGAN's) takes round((w - side) / 2), half to even: 2.5 -> 2, 3.5 -> 4; a floor
    would give 3 at 47. At the crop's own size PIL's resize returns the crop unchanged, so columns tell the offset."""
    x = np.zeros((40, width, 3), np.uint8)
    x[..., 0] = np.arange(width, dtype=np.uint8)
    out = np.asarray(fid.crop_resize(Image.fromarray(x), 40))
    assert (out[0, :, 0] == np.arange(left, left + 40)).all()


def test_resize_matches_clean_fid():
    resize = pytest.importorskip("cleanfid.resize")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    ours = fid.inception_input(fid.crop_resize(Image.fromarray(x), 256))
    crop = x[:, 60:360]  # the 300 x 300 centre of the long edge
    theirs = resize.make_resizer("PIL", False, "bicubic", (299, 299))(
        resize.make_resizer("PIL", True, "lanczos", (256, 256))(crop))
    assert np.array_equal(ours, theirs.transpose(2, 0, 1))


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    """One subset holding every feature: the estimate is permutation invariant, so it must equal the unbiased
    MMD^2 written out term by term (float64 sums of a few hundred O(1) terms: equal to ~1e-14)."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 4)) + 0.5
    k = lambda a, b: (a @ b / 4 + 1) ** 3  # noqa: E731
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    between = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) * 2 / m ** 2
    assert fid.kernel_distance(x, y, subsets=1, subset_size=1000) == pytest.approx(within - between, abs=1e-10)


def test_prompt_sets_from_a_text_file_and_from_shards_agree(tmp_path):
    from bigsid import data
    from evaluation.prompts import load_prompts

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \na bird\n")
    text = load_prompts(str(tmp_path / "p.txt"), "txt", None)
    assert text.prompts == ["a cat", "a dog", "a bird"] and text.skipped == {"empty_caption": 1}
    data.pack(tmp_path / "p.txt", tmp_path / "shards", shard_size=2)
    shards = load_prompts(str(tmp_path / "shards" / "shard-{000000..000001}.tar"), "txt", None)
    assert shards.prompts == text.prompts and shards.sha256 == text.sha256
    assert load_prompts("", "txt", ["x"]).prompts == ["x"]


# ---- CLIP and aesthetic scores ----

def test_aesthetic_head_has_the_published_layout(tmp_path):
    head = clip.AestheticHead()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                      "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                      "layers.7.bias": (1,)}
    assert sum(v.numel() for v in head.state_dict().values()) == 927_969  # sac+logos+ava1-l14-linearMSE.pth
    state = {k: torch.randn_like(v) for k, v in head.state_dict().items()}
    torch.save(state, tmp_path / "head.pth")
    loaded = clip.load_head(str(tmp_path / "head.pth"))
    e = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    w = [state[f"layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
    b = [state[f"layers.{i}.bias"] for i in (0, 2, 4, 6, 7)]
    expected = e
    for wi, bi in zip(w, b):
        expected = expected @ wi.T + bi  # linear layers only: dropout is off in eval, no activations
    assert torch.allclose(loaded(e), expected[:, 0], rtol=1e-5, atol=1e-5)
    torch.save({"layers.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(EvalError, match="aesthetic.head=.*bad.pth"):
        clip.load_head(str(tmp_path / "bad.pth"))


def test_clip_score_is_the_mean_raw_cosine_of_prefixed_captions(monkeypatch):
    """Hand-checked: image embeddings (1, 0), (0, 1), (1, 0) against caption embeddings (0.6, 0.8), (0.6, -0.8),
    (-1, 0) give cosines 0.6, -0.8, -1; the score is their mean, -0.4, negative values kept and no x100."""
    score = object.__new__(clip.CLIPScore)
    seen = []
    images = torch.tensor([[1.0, 0], [0, 1], [1, 0]])
    texts = {"A photo depicts a": [0.6, 0.8], "A photo depicts b": [0.6, -0.8], "A photo depicts c": [-1.0, 0]}

    class Encoder:
        record = {"model": "stand-in"}

        def images(self, ims):
            return images

        def texts(self, captions):
            seen.extend(captions)
            return torch.tensor([texts[c] for c in captions])

    score.encoder, score.prefix, score.resolution, score.cosines = Encoder(), "A photo depicts ", 0, []
    score.update([None] * 3, ["a", "b", "c"])
    result = score.result()["clip_score"]
    assert seen == list(texts) and result["value"] == pytest.approx(-0.4, abs=1e-7)
    assert result["convention"]["prefix"] == "A photo depicts "


def test_clip_score_sees_each_image_as_fid_crops_and_resizes_it(nets, monkeypatch):
    """GigaGAN's CLIP score: the long-edge centre crop and Lanczos resize to 256 px of FID, then CLIP's preprocessing;
    clip.resolution=0 hands CLIP the images as generated. The score is the cosine of those images' embeddings."""
    from evaluation.settings import load_settings

    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((300, 420, 3), (64, 64, 3))]
    captions = ["A photo depicts a cat", "A photo depicts a dog"]
    for resolution in (256, 0):
        settings = load_settings(["clip.backend=transformers", f"clip.weights={nets['clip']}",
                                  f"clip.resolution={resolution}"])
        score = clip.CLIPScore(settings, torch.device("cpu"), False)
        real, seen = score.encoder.images, []
        monkeypatch.setattr(score.encoder, "images", lambda ims: (seen.extend(ims), real(ims))[1])
        score.update(images, ["a cat", "a dog"])
        expected = [fid.crop_resize(im, 256) for im in images] if resolution else images
        assert len(seen) == 2 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(seen, expected))
        result = score.result()["clip_score"]
        cosine = (real(expected) * score.encoder.texts(captions)).sum(-1).mean().item()
        assert result["value"] == pytest.approx(cosine, abs=1e-6)
        assert result["convention"]["image_resize"].startswith(
            "long-edge centre crop, PIL Lanczos to 256 px, uint8" if resolution else "CLIP's preprocessing only")
        assert result["convention"]["activation"] == "quick_gelu"  # the tiny config's, as OpenAI's CLIP has it


def test_open_clip_path_with_a_tiny_custom_model(tmp_path):
    """The open_clip backend on a tiny model config registered as open_clip allows, weights from a local file."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS["bigsid-tiny"] = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                                                     "patch_size": 8, "head_width": 16},
                                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                                  "heads": 2, "layers": 1}}
    model = open_clip.create_model("bigsid-tiny")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(EvalError, match="clip.weights is not set"):
        clip.CLIPEncoder("open_clip", "bigsid-tiny", "laion2b_s12b_b42k", "", "clip", False, torch.device("cpu"))
    encoder = clip.CLIPEncoder("open_clip", "bigsid-tiny", "", str(tmp_path / "tiny.pt"), "clip", False,
                               torch.device("cpu"))
    image = Image.fromarray(np.full((40, 50, 3), 100, np.uint8))
    emb_i, emb_t = encoder.images([image]), encoder.texts(["A photo depicts a cat"])
    with torch.no_grad():
        ref_i = model.eval().encode_image(encoder.preprocess(image)[None])
    assert torch.allclose(emb_i, torch.nn.functional.normalize(ref_i, dim=-1), atol=1e-6)
    assert emb_t.shape == (1, 16) and torch.allclose(emb_t.norm(dim=-1), torch.ones(1))
    assert encoder.record["activation"] == "GELU"


def test_aesthetic_clip_is_built_with_openais_quickgelu(tmp_path):
    """OpenAI's ViT-L/14 weights were trained with QuickGELU. open_clip's plain ViT-L-14 builds exact GELU and loads
    them from a local file without a word, so the default builds the -quickgelu config, and ViT-L-14 with OpenAI's
    weights is refused before any file is read."""
    open_clip = pytest.importorskip("open_clip")
    from evaluation.settings import AestheticSettings

    default = AestheticSettings()
    with torch.device("meta"):  # the real architectures, without allocating their 430M weights
        built = {name: open_clip.create_model(name, device="meta") for name in (default.model, "ViT-L-14")}
    assert clip.activation(built[default.model]) == "QuickGELU" and clip.activation(built["ViT-L-14"]) == "GELU"
    (tmp_path / "vit-l-14.pt").write_bytes(b"never read")
    with pytest.raises(EvalError, match="aesthetic.model=ViT-L-14 builds GELU.*set aesthetic.model=ViT-L-14-quickgelu"):
        clip.CLIPEncoder("open_clip", "ViT-L-14", default.pretrained, str(tmp_path / "vit-l-14.pt"), "aesthetic",
                         False, torch.device("cpu"))


# ---- generation and the whole path ----

def test_evaluation_writes_metrics_with_conventions_and_leaves_the_run_alone(evaluated, nets):
    out, before = evaluated
    run_dir = out.parent.parent
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the run changed
    assert all(k.startswith("eval/full/") for k in set(after) - set(before))
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]) == {"fid", "clip_score", "aesthetic"}
    fid_convention = report["metrics"]["fid"]["convention"]
    assert fid_convention["resize"] == "PIL Lanczos to 256 px, uint8" and fid_convention["generated_images"] == 6
    assert fid_convention["reference_images"] == 12 and fid_convention["reference_skipped"] == 2
    assert report["metrics"]["clip_score"]["convention"]["prefix"] == "A photo depicts "
    assert report["source"]["kind"] == "generator" and report["source"]["step"] == 2
    assert report["generation"]["prompts_sha256"] and report["generation"]["num_images"] == 6
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["index"] for m in manifest] == list(range(6)) and [m["seed"] for m in manifest] == list(range(6))
    assert [m["prompt"] for m in manifest] == ["toy prompt 0", "toy prompt 1"] * 3  # the run's sample prompts
    assert all(np.isfinite(v["value"]) for v in report["metrics"].values())


def test_a_finished_evaluation_is_not_redone(evaluated, nets, monkeypatch):
    out, _ = evaluated
    written = snapshot(out)
    monkeypatch.setattr(generate, "write_atomic", lambda *a: pytest.fail("rewrote a file"))
    assert main(["eval", str(out.parent.parent), *metric_args(nets, "name=full")]) == 0
    assert snapshot(out) == written
    # Other CLIP settings: only the CLIP score is computed again, from the images already there.
    monkeypatch.undo()
    old = values(out)
    assert main(["eval", str(out.parent.parent), *metric_args(nets, "name=full", "clip.prefix=")]) == 0
    new = values(out)
    assert new["clip_score"] != old["clip_score"] and {k: v for k, v in new.items() if k != "clip_score"} == \
        {k: v for k, v in old.items() if k != "clip_score"}
    assert snapshot(out)["manifest.jsonl"] == written["manifest.jsonl"]
    assert main(["eval", str(out.parent.parent), *metric_args(nets, "name=full")]) == 0  # back as the others expect


def test_two_ranks_write_every_index_once_and_the_same_images(evaluated, nets, monkeypatch, tmp_path):
    out, _ = evaluated
    run_dir = out.parent.parent
    writes = []
    real = generate.write_atomic
    monkeypatch.setattr(generate, "write_atomic", lambda path, fn: (writes.append(path.name), real(path, fn))[1])
    for rank in (1, 0):  # rank 0 scores once rank 1's share is on disk
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["eval", str(run_dir), *metric_args(nets, "name=two-ranks")]) == 0
    pngs = sorted(w for w in writes if w.endswith(".png"))
    assert pngs == [f"{i:06d}.png" for i in range(6)]  # each index once
    sharded = run_dir / "eval" / "two-ranks"
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(generate.image_path(sharded, i))),
                              np.asarray(Image.open(generate.image_path(out, i))))
    assert values(sharded) == values(out)


def test_a_killed_evaluation_resumes_to_the_same_metrics(evaluated, nets, monkeypatch):
    out, _ = evaluated
    run_dir = out.parent.parent
    real, pngs = generate.write_atomic, []

    def dies_after_three(path, fn):
        if path.suffix == ".png":
            pngs.append(path.name)
            if len(pngs) == 4:
                raise KeyboardInterrupt  # killed while writing the fourth image
        real(path, fn)

    monkeypatch.setattr(generate, "write_atomic", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        main(["eval", str(run_dir), *metric_args(nets, "name=killed")])
    killed = run_dir / "eval" / "killed"
    assert not (killed / "metrics.json").exists()
    pngs.clear()
    monkeypatch.setattr(generate, "write_atomic", lambda path, fn: (pngs.append(path.name), real(path, fn))[1])
    assert main(["eval", str(run_dir), *metric_args(nets, "name=killed")]) == 0
    assert sorted(p for p in pngs if p.endswith(".png")) == [f"{i:06d}.png" for i in range(3, 6)]
    assert values(killed) == values(out)


def test_teacher_sampler_baseline_and_comparison_table(evaluated, nets, capsys):
    out, _ = evaluated
    run_dir = out.parent.parent
    assert main(["eval", str(run_dir), *metric_args(nets, "sampler=teacher", "teacher_steps=2", "guidance=2")]) == 0
    teacher = run_dir / "eval" / "teacher-ddim2-cfg2"
    assert json.loads((teacher / "metrics.json").read_text())["source"]["kind"] == "teacher"
    capsys.readouterr()
    assert main(["eval", "--compare", str(out), str(teacher)]) == 0
    table = capsys.readouterr().out
    assert "| run/full | generator | 2 | 6 |" in table
    assert "| run/teacher-ddim2-cfg2 | teacher, 2 steps, cfg 2.0 |" in table
    assert "fid ↓" in table and "- clip_score: backend=transformers" in table and "DIFFER" not in table


def test_model_card_quotes_the_latest_evaluation_with_its_conventions(evaluated, nets, tmp_path):
    out, _ = evaluated
    latest = max((json.loads(p.read_text()) for p in out.parent.glob("*/metrics.json")
                  if json.loads(p.read_text())["source"].get("kind") == "generator" and "fid" in p.read_text()),
                 key=lambda r: (r["written"], r["name"]))
    assert main(["export", str(out.parent.parent), str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"`bigsid eval` ({latest['name']}): 6 images" in card
    assert f"| fid | {latest['metrics']['fid']['value']:.4f} | protocol=clean-fid" in card
    assert "prefix=A photo depicts " in card
    # The export, run by stock diffusers, makes the run's images: its latents match to 1e-5 (tests/test_export.py),
    # so a decoded uint8 pixel can differ by one level where it sat at a rounding boundary.
    (tmp_path / "prompts.txt").write_text("toy prompt 0\ntoy prompt 1\n")  # the run's sample prompts, in order
    assert main(["eval", str(tmp_path / "export"), *metric_args(nets, f"out={tmp_path / 'ev'}",
                                                                f"prompts={tmp_path / 'prompts.txt'}")]) == 0
    for i in range(6):
        a, b = (np.asarray(Image.open(generate.image_path(f, i)), np.int16) for f in (tmp_path / "ev", out))
        assert np.abs(a - b).max() <= 1
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["source"]["kind"] == "export"


def test_reference_statistics_from_shards_equal_those_from_the_folder(nets, tmp_path):
    """The same files in a tar shard: the same images, so the same statistics up to the order of float64 sums."""
    import tarfile

    from evaluation.settings import FIDSettings

    with tarfile.open(tmp_path / "real-000000.tar", "w") as tar:
        for path in sorted(nets["real"].iterdir()):
            tar.add(path, arcname=f"{path.stem}.{path.suffix.lstrip('.')}")
    inception = fid.Inception(FIDSettings(inception=str(nets["inception"])), torch.device("cpu"))
    stats = {}
    for name, reference in (("folder", nets["real"]), ("shards", tmp_path / "real-{000000..000000}.tar")):
        settings = FIDSettings(inception=str(nets["inception"]), reference=str(reference),
                               reference_stats=str(tmp_path / f"{name}.npz"))
        stats[name] = fid.reference_stats(settings, inception, batch_size=5)
    # broken.png is skipped; notes.txt is no image member of the shard, so not even looked at
    assert int(stats["shards"]["count"]) == 12 and int(stats["shards"]["skipped"]) == 1
    assert np.allclose(stats["shards"]["mu"], stats["folder"]["mu"], rtol=0, atol=1e-12)
    assert np.allclose(stats["shards"]["sigma"], stats["folder"]["sigma"], rtol=0, atol=1e-12)


def test_reference_statistics_of_other_images_are_refused(nets, tmp_path, monkeypatch):
    """The statistics record the listing (names and sizes) of the images they were computed from: the same images
    elsewhere reuse them; an image more, or one renamed, is refused naming the file to delete, which is left as it
    was; a file recording no images is refused; the default cache computes a new file for other images."""
    from evaluation.settings import FIDSettings

    real, moved, stats_file = tmp_path / "real", tmp_path / "moved", tmp_path / "stats.npz"
    shutil.copytree(nets["real"], real)
    shutil.copytree(nets["real"], moved)
    inception = fid.Inception(FIDSettings(inception=str(nets["inception"])), torch.device("cpu"))

    def stats(reference, cache=""):
        settings = FIDSettings(inception=str(nets["inception"]), reference=str(reference), reference_stats=cache)
        return fid.reference_stats(settings, inception, batch_size=5)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert int(stats(real)["count"]) == 12
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(real / "extra.png")
    assert int(stats(real)["count"]) == 13  # the default cache: a second file for the other images, the first kept
    assert len(list((tmp_path / "cache" / "bigsid" / "fid").glob("*.npz"))) == 2

    first = stats(moved, str(stats_file))
    written = stats_file.read_bytes()
    monkeypatch.setattr(inception, "features", lambda images: pytest.fail("recomputed cached statistics"))
    assert np.array_equal(stats(nets["real"], str(stats_file))["mu"], first["mu"])  # the same images elsewhere
    with pytest.raises(EvalError, match=re.escape(f"computed from other images than fid.reference={real} holds now "
                                                  f"(14 files in {moved} then, 15 in {real} now")
                       + ".*" + re.escape(f"delete {stats_file}")):
        stats(real, str(stats_file))
    (moved / "00.png").rename(moved / "00-renamed.png")
    with pytest.raises(EvalError, match="computed from other images"):
        stats(moved, str(stats_file))
    assert stats_file.read_bytes() == written
    np.savez(tmp_path / "legacy.npz", **{k: v for k, v in first.items() if k != "reference"})
    with pytest.raises(EvalError, match="do not record which images they were computed from"):
        stats(nets["real"], str(tmp_path / "legacy.npz"))


def test_reward_models_without_package_or_weights_are_skipped_with_a_message(evaluated, nets):
    out, _ = evaluated
    assert main(["eval", str(out.parent.parent), *metric_args(nets, "name=full",
                                                              "metrics=[imagereward,pickscore,clip]")]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert "rewards.pickscore is not set" in report["skipped"]["pickscore"]
    # the package is absent in the test environment; where it is installed the weights file is
    assert any(reason in report["skipped"]["imagereward"]
               for reason in ("pip install image-reward", "rewards.imagereward is not set"))
    assert set(report["metrics"]) == {"fid", "clip_score", "aesthetic"}  # what was scored before stays


# ---- bad input ----

def test_missing_weights_file_names_file_what_and_key(run_dir, nets, tmp_path, capsys):
    missing = tmp_path / "inception-2015-12-05.pt"
    assert main(["eval", str(run_dir), *metric_args(nets, f"fid.inception={missing}", "name=missing")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "fid.inception" in err and "clean-fid's TorchScript Inception" in err
    assert main(["eval", str(run_dir), *metric_args(nets, "aesthetic.head=", "name=missing")]) == 2
    assert "aesthetic.head is not set" in capsys.readouterr().err
    assert main(["eval", str(run_dir), *metric_args(nets, "clip.backend=open_clip", "clip.weights=",
                                                    "name=missing")]) == 2
    err = capsys.readouterr().err  # without open_clip its package is missing, with it the ViT-g-14 weights are
    assert "pip install 'bigsid[eval]'" in err or "clip.weights is not set: it must point to the weights of CLIP " \
        "ViT-g-14 (laion2b_s12b_b42k)" in err


def test_bad_settings_say_what_they_must_be(tmp_path, capsys):
    """Checked when the settings are read: KID's subsets=0 and subset_size=1 would otherwise fail (division by zero,
    NaN) only after every image was generated."""
    for override, message in (("fid.kid_subset_size=1", "fid.kid_subset_size: invalid value 1; it must be an "
                                                        "integer >= 2"),
                              ("fid.kid_subsets=0", "fid.kid_subsets: invalid value 0; it must be an integer >= 1"),
                              ("sampler=ddim", "sampler: invalid value 'ddim'; it must be generator or teacher"),
                              ("clip.resolution=-1", "clip.resolution: invalid value -1; it must be a size in pixels, "
                                                     "or 0 for none")):
        assert main(["eval", str(tmp_path), "metrics=[fid]", "fid.kid=true", override]) == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_slurm_tasks_outside_an_srun_step_are_refused_not_left_waiting(tmp_path, monkeypatch, capsys):
    """sbatch --ntasks=4 exports SLURM_NTASKS=4 to its one script process: without srun no other task exists, and
    rank 0 of 4 would wait forever for their images."""
    for name in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    assert generate.rank_and_world() == (0, 1)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert main(["eval", str(tmp_path), "metrics=[fid]"]) == 2
    assert "SLURM_NTASKS=4 but this process is no task of an srun job step" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # task 2 of srun's step
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert generate.rank_and_world() == (2, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's environment comes first
    monkeypatch.setenv("RANK", "1")
    assert generate.rank_and_world() == (1, 2)


def test_reference_statistics_of_another_convention_are_refused(evaluated, nets, capsys):
    out, _ = evaluated
    assert main(["eval", str(out.parent.parent), *metric_args(nets, "fid.resolution=128", "name=r128",
                                                              f"fid.reference={nets['stats']}")]) == 2
    err = capsys.readouterr().err
    assert "another convention" in err and "PIL Lanczos to 256 px" in err and "PIL Lanczos to 128 px" in err


def test_empty_prompt_set_other_settings_and_other_teacher_family(evaluated, teacher_dir, nets, tmp_path, capsys):
    out, _ = evaluated
    run_dir = out.parent.parent
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main(["eval", str(run_dir), *metric_args(nets, f"prompts={tmp_path / 'empty.txt'}", "name=e")]) == 2
    assert "prompt set is empty" in capsys.readouterr().err
    before = snapshot(out)
    assert main(["eval", str(run_dir), *metric_args(nets, "name=full", "num_images=5")]) == 2
    assert "holds images made with other settings (num_images: 6 there, 5 now)" in capsys.readouterr().err
    assert snapshot(out) == before
    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    assert main(["eval", str(run_dir), *metric_args(nets, f"teacher={other}", "name=x")]) == 2
    assert "KandinskyPipeline" in capsys.readouterr().err


# ---- the toy family ----

def test_toy_run_ground_truth_without_a_trainer(run_dir, monkeypatch):
    """The toy family rebuilds the run's networks and reads the EMA: the same numbers training's own final
    evaluation wrote, computed by the same code on the same weights and noise, and no Trainer."""
    trained = json.loads((run_dir / "eval" / "toy_metrics.json").read_text())
    import bigsid.trainer

    monkeypatch.setattr(bigsid.trainer, "Trainer", lambda *a, **k: pytest.fail("built a Trainer"))
    before = {k: v for k, v in snapshot(run_dir).items() if not k.startswith("eval/")}
    assert main(["eval", str(run_dir), "eval.num_samples=16"]) == 0
    assert {k: v for k, v in snapshot(run_dir).items() if not k.startswith("eval/")} == before
    again = json.loads((run_dir / "eval" / "toy_metrics.json").read_text())
    assert again == trained
    report = json.loads((run_dir / "eval" / f"step-{trained['step']:09d}" / "metrics.json").read_text())
    assert report["metrics"]["fd_generator"]["value"] == trained["fd_generator"]


# ---- during training ----

def test_training_logs_a_periodic_image_evaluation(teacher_dir, nets, tmp_path):
    """A teacher without an analytic truth (the toy pipeline, its truth file removed) trained with --eval: eval/fid and
    eval/clip_score at every eval_every step, against images seen, and the curves' plot."""
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    (teacher / "bigsid_toy.json").unlink()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    run = tmp_path / "run"
    assert main(["train", "-", *TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher}", "data.source=text",
                 f"data.path={prompts}", "eval.sample_prompts=[a cat]", "train.eval_every=1", "train.batch_size=4",
                 "train.total_nimg=8", f"train.run_dir={run}",
                 "--eval", *metric_args(nets, f"prompts={prompts}", "metrics=[fid,clip]")]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["nimg"], r["eval/fid"], r["eval/clip_score"]) for r in rows if "eval/fid" in r]
    assert [e[0] for e in evals] == [0, 4, 8] and all(np.isfinite(e[1:]).all() for e in evals)
    assert evals[0][1] != evals[-1][1]  # the generator changed, and its score with it
    assert (run / "eval" / "training_curves.png").is_file()
    conventions = json.loads((run / "eval" / "training_eval.json").read_text())
    assert conventions["images"] == 6 and conventions["metrics"]["fid"]["protocol"] == "clean-fid"
    assert not (run / "eval" / "toy_metrics.json").exists()


def test_bigsid_core_never_imports_evaluation():
    import ast

    core = Path(__file__).resolve().parents[1] / "bigsid"
    for path in core.rglob("*.py"):
        if path.name == "cli.py":  # the command line wires evaluation in
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "evaluation" for n in names), path
