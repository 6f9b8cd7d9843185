"""FID (and KID) in the clean-fid protocol that SiD-LSG's reported numbers use, following GigaGAN's evaluation.

Real and generated images alike: centre crop of the long edge to a square, PIL Lanczos to `resolution` (256) as
uint8, then clean-fid's "clean" mode: each channel resized to 299 x 299 as float32 by PIL bicubic and clipped to
[0, 255], then the Inception network's 2048-d pool features of (x - 128) / 128. The network is clean-fid's TorchScript
file inception-2015-12-05.pt from a local path (clean-fid itself would download it at run time). TorchScript runs in
torch's own interpreter, which cannot call Python, and its file hash is part of the convention.

Reference statistics (mean, covariance and the features, for KID) are computed once and cached with their
convention and the identity of the real images (their path, and the count and a hash of their sorted file listing,
names and sizes); a cache made under another convention, or from images other than fid.reference holds now, is
refused, naming both."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bigsid.toy import frechet_from_stats
from evaluation.settings import EvalError, FIDSettings, weights_file

log = logging.getLogger("evaluation.fid")
INCEPTION_SIZE = 299
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm")
INCEPTION_WHAT = ("clean-fid's TorchScript Inception network, inception-2015-12-05.pt (from "
                  "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt)")


def crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Centre crop of the long edge to the short edge's length, then PIL Lanczos to resolution x resolution. The
    offset is rounded as torchvision's center_crop rounds it (GigaGAN's CenterCropLongEdge): Python's round, half
    to even, which moves the crop one pixel from a floor's where the edges differ by 3 mod 4."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = round((w - side) / 2), round((h - side) / 2)
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)


def inception_input(image: Image.Image) -> np.ndarray:
    """clean-fid's "clean" resize: [3, 299, 299] float32 in [0, 255], each channel by PIL bicubic in float."""
    x = np.asarray(image, dtype=np.float32)
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    return np.stack([np.asarray(Image.fromarray(x[:, :, c]).resize(size, Image.BICUBIC)).clip(0, 255)
                     for c in range(3)])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Inception:
    """images -> float64 features [N, D] through the TorchScript file's `layers` (the network without its resize)."""

    def __init__(self, settings: FIDSettings, device: torch.device):
        path = weights_file(settings.inception, "fid.inception", INCEPTION_WHAT)
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise EvalError(f"fid.inception={path} is not a TorchScript file ({err}); it must be "
                            f"{INCEPTION_WHAT}") from None
        self.device, self.resolution = device, settings.resolution
        self.convention = {"protocol": "clean-fid", "crop": "long-edge centre crop, offset rounded half to even",
                           "resize": f"PIL Lanczos to {settings.resolution} px, uint8",
                           "inception_resize": "clean: PIL bicubic per channel to 299, float32",
                           "network": path.name, "network_sha256": _sha256(path)}

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> np.ndarray:
        x = torch.from_numpy(np.stack([inception_input(crop_resize(im, self.resolution)) for im in images]))
        x = x.to(self.device)
        return self.net.layers((x - 128) / 128).reshape(len(images), -1).double().cpu().numpy()


def kernel_distance(x: np.ndarray, y: np.ndarray, subsets: int, subset_size: int, seed: int = 0) -> float:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged over random subsets of
    min(n, subset_size) features of each set, as clean-fid computes it (its subsets are drawn from a fixed seed
    here, so the value is reproducible)."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    m = min(len(x), len(y), subset_size)
    total = 0.0
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        within = (a @ a.T / d + 1) ** 3 + (b @ b.T / d + 1) ** 3
        between = (a @ b.T / d + 1) ** 3
        total += (within.sum() - np.diag(within).sum()) / (m - 1) - between.sum() * 2 / m
    return float(total / subsets / m)


# ---- reference statistics ----

def _reference_images(reference: str):
    """(name, opener) of every candidate image of a folder (recursive) or of webdataset tar shards."""
    path = Path(reference)
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            yield str(file), lambda file=file: file.open("rb")
        return
    from bigsid import data

    for url in _shards(reference):
        try:
            with tarfile.open(data._local_path(url) or url) as archive:
                for info in archive:
                    if info.isreg() and Path(info.name).suffix.lower() in IMAGE_SUFFIXES:
                        content = archive.extractfile(info).read()
                        yield f"{url}:{info.name}", lambda content=content: io.BytesIO(content)
        except (OSError, tarfile.TarError) as err:
            log.warning("fid.reference: shard %s unreadable from here on (%s)", url, err)


def _shards(reference: str) -> list[str]:
    from bigsid import data

    try:
        return data._expand_shards(reference)
    except data.DataError as err:
        raise EvalError(f"fid.reference={reference}: {err}") from None


def reference_identity(reference: str) -> dict:
    """Which real images statistics are computed from, told without reading them: the path, the number of files and a
    hash of the sorted listing of names (relative to the folder; shards' file names) and sizes. Images added, removed,
    renamed or replaced by files of another size change it."""
    path = Path(reference)
    if path.is_dir():
        listing = sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*") if p.is_file())
        where = str(path.resolve())
    else:
        from bigsid import data

        local = {url: data._local_path(url) for url in _shards(reference)}
        listing = [(Path(file).name, os.path.getsize(file)) if file else (url, -1) for url, file in local.items()]
        where = reference
    text = "\n".join(f"{name}\t{size}" for name, size in listing)
    return {"path": where, "files": len(listing), "listing_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _stats_path(settings: FIDSettings, convention: dict, identity: dict) -> Path:
    """fid.reference_stats, else a cache file named by the real images' identity and the convention: another
    resolution, Inception file or set of images computes its own statistics there rather than meeting a refusal."""
    if settings.reference_stats:
        return Path(settings.reference_stats)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bigsid" / "fid"
    key = f"{json.dumps(identity, sort_keys=True)}|{json.dumps(convention, sort_keys=True)}"
    return cache / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _compare(found: dict, asked: dict, where: Path) -> None:
    changed = sorted(k for k in set(found) | set(asked) if found.get(k) != asked.get(k))
    if changed:
        raise EvalError(f"the reference statistics {where} were computed under another convention ("
                        + "; ".join(f"{k}: {found.get(k)!r} there, {asked.get(k)!r} asked" for k in changed)
                        + "): point fid.reference_stats to a new file, or fid.reference to the real images")


def _check_identity(stored: dict, identity: dict, where: Path, reference: str) -> None:
    """The listing decides, not the path: statistics copied along with the images to another mount stay valid."""
    remedy = (f"delete {where} to recompute them, or point fid.reference_stats to a new file (or fid.reference to "
              "the images they were made from)")
    if "reference" not in stored:
        raise EvalError(f"the reference statistics {where} do not record which images they were computed from, so "
                        f"they cannot be checked against fid.reference={reference}: {remedy}")
    found = json.loads(str(stored["reference"]))
    if (found["files"], found["listing_sha256"]) != (identity["files"], identity["listing_sha256"]):
        raise EvalError(f"the reference statistics {where} were computed from other images than fid.reference="
                        f"{reference} holds now ({found['files']} files in {found['path']} then, "
                        f"{identity['files']} in {identity['path']} now, or files renamed or changed): {remedy}")


def load_stats(path: Path, convention: dict) -> dict:
    with np.load(path, allow_pickle=False) as f:
        stored = {k: f[k] for k in f.files}
    if "convention" not in stored:
        raise EvalError(f"{path} records no convention, so its statistics cannot be checked against "
                        f"{json.dumps(convention)}; recompute them from the real images with fid.reference=FOLDER")
    _compare(json.loads(str(stored["convention"])), convention, path)
    return stored


def reference_stats(settings: FIDSettings, inception: Inception, batch_size: int) -> dict:
    """{"mu", "sigma", "features", "count", "skipped"} of the real images, cached with their convention and
    identity."""
    if not settings.reference:
        raise EvalError("fid.reference is not set: point it to the real images (a folder or webdataset shards, "
                        "e.g. COCO-2014 val) or to a statistics .npz this package wrote")
    if settings.reference.endswith(".npz"):
        return load_stats(weights_file(settings.reference, "fid.reference", "reference statistics (.npz)"),
                          inception.convention)
    identity = reference_identity(settings.reference)
    path = _stats_path(settings, inception.convention, identity)
    if path.is_file():
        stored = load_stats(path, inception.convention)
        _check_identity(stored, identity, path, settings.reference)
        return stored
    features, batch, skipped, first_bad = [], [], 0, None
    for name, opener in _reference_images(settings.reference):
        try:
            with opener() as f:
                image = Image.open(f)
                image.load()
            batch.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            skipped += 1
            first_bad = first_bad or f"{name} ({type(err).__name__})"
            continue
        if len(batch) == batch_size:
            features.append(inception.features(batch))
            batch = []
    if batch:
        features.append(inception.features(batch))
    count = sum(len(f) for f in features)
    if skipped:
        log.warning("fid.reference: skipped %d unreadable or non-image files, the first %s", skipped, first_bad)
    if count < 2:
        raise EvalError(f"fid.reference={settings.reference}: {count} readable images ({skipped} skipped); FID needs "
                        "at least 2, and tens of thousands for the papers' numbers")
    feats = np.concatenate(features)
    stats = {"mu": feats.mean(0), "sigma": np.cov(feats, rowvar=False), "features": feats.astype(np.float32),
             "count": np.array(count), "skipped": np.array(skipped),
             "convention": np.array(json.dumps(inception.convention)), "reference": np.array(json.dumps(identity))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **stats)
    os.replace(tmp, path)
    log.info("reference statistics of %d images (%d skipped) cached in %s", count, skipped, path)
    return stats


class FID:
    """Accumulates generated images' features; `result` scores them against the reference statistics."""

    name = "fid"

    def __init__(self, settings: FIDSettings, device: torch.device, batch_size: int):
        self.settings = settings
        self.inception = Inception(settings, device)
        self.reference = reference_stats(settings, self.inception, batch_size)
        self.features = []

    def update(self, images: list[Image.Image], prompts: list[str]) -> None:
        self.features.append(self.inception.features(images))

    def result(self) -> dict:
        """Scores the images given to update() since the last result()."""
        feats, self.features = np.concatenate(self.features), []
        if len(feats) < 2:
            raise EvalError("FID needs at least 2 generated images; raise num_images")
        ref = self.reference
        value = frechet_from_stats(feats.mean(0), np.cov(feats, rowvar=False), ref["mu"], ref["sigma"])
        identity = json.loads(str(ref["reference"])) if "reference" in ref else {}
        convention = {**self.inception.convention, "generated_images": len(feats),
                      "reference_images": int(ref["count"]), "reference_skipped": int(ref["skipped"]),
                      "reference": self.settings.reference, "reference_listing_sha256": identity.get("listing_sha256")}
        out = {"fid": {"value": value, "convention": convention}}
        if self.settings.kid:
            kid = kernel_distance(feats, ref["features"].astype(np.float64), self.settings.kid_subsets,
                                  self.settings.kid_subset_size)
            out["kid"] = {"value": kid, "convention": {**convention, "kernel": "(x.y / d + 1)^3, unbiased MMD^2",
                                                       "subsets": self.settings.kid_subsets,
                                                       "subset_size": self.settings.kid_subset_size}}
        return out
