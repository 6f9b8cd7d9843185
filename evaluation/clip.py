"""CLIP score and the LAION aesthetic score, each from a CLIP model loaded by open_clip (the papers' convention) or
from a transformers CLIPModel folder (the same networks in transformers' format, e.g. openai/clip-vit-large-patch14).

CLIP score as SiD-LSG reports it (GigaGAN's evaluation code): open_clip ViT-g-14 / laion2b_s12b_b42k, each image first
centre-cropped and PIL-Lanczos-resized to the FID resolution (256) as uint8, exactly as FID's images are, each caption
prefixed "A photo depicts ", the mean over images of the raw cosine between the image and caption embeddings (the
0.30 scale: no x100, no clipping at 0, unlike torchmetrics' CLIPScore). GigaGAN's round trip through floats in [-1, 1]
truncates, lowering 63 of the 256 uint8 levels by one; here the images stay as crop_resize gives them.

Aesthetic score: the LAION aesthetic predictor v2 (improved-aesthetic-predictor, sac+logos+ava1-l14-linearMSE.pth), a
linear MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between and no activations, on the L2-normalised image
embedding of OpenAI CLIP ViT-L/14 with its QuickGELU activation (open_clip's ViT-L-14-quickgelu); the score is the
mean over images."""

from __future__ import annotations

import pickle

import torch
from torch import nn

from evaluation.fid import crop_resize
from evaluation.settings import EvalError, weights_file

AESTHETIC_WHAT = ("the LAION aesthetic predictor v2 head, sac+logos+ava1-l14-linearMSE.pth (from "
                  "github.com/christophschuhmann/improved-aesthetic-predictor, about 3.7 MB)")


class CLIPEncoder:
    """L2-normalised image and text embeddings from one CLIP model; `record` names the model and its weights."""

    def __init__(self, backend: str, model: str, pretrained: str, weights: str, key: str, allow_download: bool,
                 device: torch.device):
        self.device = device
        self.record = {"backend": backend, "model": model, "pretrained": pretrained}
        what = f"the weights of CLIP {model} ({pretrained})"
        if backend == "open_clip":
            try:
                import open_clip
            except ImportError:
                raise EvalError(f"{key}.backend=open_clip needs the open_clip package: pip install 'bigsid[eval]'; "
                                f"or {key}.backend=transformers with {key}.weights=a transformers CLIPModel folder of "
                                "the same network") from None
            _check_activation(open_clip, model, pretrained, key)
            if not weights and not allow_download:
                weights_file("", f"{key}.weights", f"{what}, an open_clip checkpoint (open_clip_pytorch_model.bin "
                             "or .safetensors); or pass allow_download=true to fetch it from the hub")
            source = str(weights_file(weights, f"{key}.weights", what)) if weights else pretrained
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=source,
                                                                                   device=device)
            self.tokenizer = open_clip.get_tokenizer(model)
            self.record["activation"] = activation(self.model)
        else:
            from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

            if not weights and not allow_download:
                weights_file("", f"{key}.weights", f"{what}, a transformers CLIPModel folder")
            source = str(weights_file(weights, f"{key}.weights", what, folder=True)) if weights else model
            self.model = CLIPModel.from_pretrained(source).to(device)
            self.processor = CLIPImageProcessor.from_pretrained(source)
            self.tokenizer = CLIPTokenizer.from_pretrained(source)
            self.record["activation"] = self.model.config.vision_config.hidden_act
        self.backend = backend
        self.record["weights"] = weights or "hub"
        self.model.eval()

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        if self.backend == "open_clip":
            x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            emb = self.model.encode_image(x)
        else:
            x = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            emb = _projected(self.model.get_image_features(pixel_values=x))
        return nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        if self.backend == "open_clip":
            emb = self.model.encode_text(self.tokenizer(texts).to(self.device))
        else:
            tokens = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").to(self.device)
            emb = _projected(self.model.get_text_features(**tokens))
        return nn.functional.normalize(emb.float(), dim=-1)


def _check_activation(open_clip, model: str, pretrained: str, key: str) -> None:
    """Weights trained with QuickGELU (OpenAI's) load without complaint into a GELU model of the same shape, and a
    local weights file bypasses open_clip's own warning, so the embeddings would be silently wrong."""
    if not open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False):
        return
    if not (open_clip.get_model_config(model) or {}).get("quick_gelu", False):
        fix = f"{model}-quickgelu" if f"{model}-quickgelu" in open_clip.list_models() else "a -quickgelu model"
        raise EvalError(f"{key}.model={model} builds GELU layers, but the {key}.pretrained={pretrained} weights were "
                        f"trained with QuickGELU and give other embeddings under GELU: set {key}.model={fix}")


def activation(model: nn.Module) -> str:
    """The open_clip model's transformer activation, as built."""
    return "+".join(sorted({type(m).__name__ for m in model.modules()} & {"QuickGELU", "GELU"})) or "other"


def _projected(out) -> torch.Tensor:
    """transformers 5 returns the projected embedding as pooler_output of a model output; earlier, a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPScore:
    name = "clip_score"

    def __init__(self, settings, device: torch.device, allow_download: bool):
        s = settings.clip
        self.encoder = CLIPEncoder(s.backend, s.model, s.pretrained, s.weights, "clip", allow_download, device)
        self.prefix, self.resolution = s.prefix, s.resolution
        self.cosines: list[torch.Tensor] = []

    def update(self, images: list, prompts: list[str]) -> None:
        if self.resolution:
            images = [crop_resize(im, self.resolution) for im in images]
        image, text = self.encoder.images(images), self.encoder.texts([self.prefix + p for p in prompts])
        self.cosines.append((image * text).sum(-1).cpu())

    def result(self) -> dict:
        """Scores the images given to update() since the last result()."""
        cos, self.cosines = torch.cat(self.cosines).double(), []
        return {self.name: {"value": cos.mean().item(), "convention": {
            **self.encoder.record, "prefix": self.prefix, "statistic": "mean raw cosine (no x100, no clipping)",
            "image_resize": (f"long-edge centre crop, PIL Lanczos to {self.resolution} px, uint8, then CLIP's"
                             if self.resolution else "CLIP's preprocessing only"),
            "images": len(cos)}}}


class AestheticHead(nn.Module):
    """The predictor's MLP, laid out as the published file's state dict: layers.{0,2,4,6,7}.{weight,bias}."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)[:, 0]


def load_head(path: str) -> AestheticHead:
    file = weights_file(path, "aesthetic.head", AESTHETIC_WHAT)
    head = AestheticHead()
    try:
        head.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    except (RuntimeError, pickle.UnpicklingError, EOFError, TypeError) as err:
        raise EvalError(f"aesthetic.head={path} does not hold the predictor's state dict ({err}); it must be "
                        f"{AESTHETIC_WHAT}") from None
    return head.eval()


class AestheticScore:
    name = "aesthetic"

    def __init__(self, settings, device: torch.device, allow_download: bool):
        s = settings.aesthetic
        self.head = load_head(s.head).to(device)
        self.encoder = CLIPEncoder(s.backend, s.model, s.pretrained, s.weights, "aesthetic", allow_download, device)
        self.scores: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, images: list, prompts: list[str]) -> None:
        emb = self.encoder.images(images)
        expected = self.head.layers[0].in_features
        if emb.shape[1] != expected:
            raise EvalError(f"the aesthetic head takes {expected}-d CLIP embeddings and aesthetic.model gives "
                            f"{emb.shape[1]}-d ones: it needs OpenAI CLIP ViT-L/14 "
                            "(aesthetic.model=ViT-L-14-quickgelu, aesthetic.pretrained=openai)")
        self.scores.append(self.head(emb).cpu())

    def result(self) -> dict:
        """Scores the images given to update() since the last result()."""
        scores, self.scores = torch.cat(self.scores).double(), []
        return {self.name: {"value": scores.mean().item(), "convention": {
            "predictor": "LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE)", "clip": self.encoder.record,
            "embedding": "L2-normalised image embedding", "statistic": "mean", "images": len(scores)}}}
