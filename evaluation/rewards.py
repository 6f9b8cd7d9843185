"""Human-preference reward models behind the metric interface (update(images, prompts), result()). Each needs its
own package or weights; when they are absent the metric is skipped with a message saying what to install or stage,
and the evaluation goes on with the others."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from evaluation.clip import CLIPEncoder
from evaluation.settings import EvalError, weights_file


class Unavailable(Exception):
    """A metric that cannot run here; the message says what it needs."""


def _need(package: str, install: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise Unavailable(f"needs the {package} package: {install}")


def _file(path: str, key: str, what: str, folder: bool = False):
    try:
        return weights_file(path, key, what, folder)
    except EvalError as err:
        raise Unavailable(str(err)) from None


class _Mean:
    """Scores per image, reported as their mean with a convention."""

    name = ""
    convention: dict = {}

    def __init__(self):
        self.scores: list[float] = []

    def result(self) -> dict:
        """Scores the images given to update() since the last result()."""
        scores, self.scores = self.scores, []
        return {self.name: {"value": float(torch.tensor(scores, dtype=torch.float64).mean()),
                            "convention": {**self.convention, "statistic": "mean", "images": len(scores)}}}


class ImageReward(_Mean):
    name = "imagereward"

    def __init__(self, settings, device: torch.device, allow_download: bool):
        super().__init__()
        _need("ImageReward", "pip install image-reward")
        path = _file(settings.rewards.imagereward, "rewards.imagereward",
                     "ImageReward-v1.0.pt (THUDM/ImageReward), with med_config.json beside it")
        import ImageReward as RM

        self.model = RM.load(str(path), device=device, med_config=str(path.with_name("med_config.json")))
        self.convention = {"model": "ImageReward-v1.0", "weights": str(path)}

    @torch.no_grad()
    def update(self, images: list, prompts: list[str]) -> None:
        for image, prompt in zip(images, prompts):
            self.scores.append(float(self.model.score(prompt, [image])))


class PickScore(_Mean):
    """logit_scale * cosine of PickScore_v1's CLIP-H embeddings (the ~22 scale; SIM reports it divided by 100)."""

    name = "pickscore"

    def __init__(self, settings, device: torch.device, allow_download: bool):
        super().__init__()
        r = settings.rewards
        model = _file(r.pickscore, "rewards.pickscore", "a transformers folder of yuvalkirstain/PickScore_v1",
                      folder=True)
        processor = _file(r.pickscore_processor or r.pickscore, "rewards.pickscore_processor",
                          "a transformers processor folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K", folder=True)
        self.encoder = CLIPEncoder("transformers", "PickScore_v1", "", str(model), "rewards.pickscore", False, device)
        if processor != model:
            from transformers import CLIPImageProcessor, CLIPTokenizer

            self.encoder.processor = CLIPImageProcessor.from_pretrained(processor)
            self.encoder.tokenizer = CLIPTokenizer.from_pretrained(processor)
        self.scale = self.encoder.model.logit_scale.exp().item()
        self.convention = {"model": "PickScore_v1", "weights": str(model), "scale": "logit_scale * cosine"}

    def update(self, images: list, prompts: list[str]) -> None:
        cos = (self.encoder.images(images) * self.encoder.texts(prompts)).sum(-1)
        self.scores += (self.scale * cos).tolist()


class HPSv2(_Mean):
    """Cosine of HPSv2.1's fine-tuned open_clip ViT-H-14 embeddings (papers print it x100)."""

    name = "hpsv2"

    def __init__(self, settings, device: torch.device, allow_download: bool):
        super().__init__()
        _need("open_clip", "pip install 'bigsid[eval]'")
        path = _file(settings.rewards.hpsv2, "rewards.hpsv2", "HPS_v2.1_compressed.pt (xswu/HPSv2)")
        import open_clip

        model, _, self.preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None, device=device)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model, self.tokenizer, self.device = model.eval(), open_clip.get_tokenizer("ViT-H-14"), device
        self.convention = {"model": "HPSv2.1 (open_clip ViT-H-14)", "weights": str(path), "scale": "cosine"}

    @torch.no_grad()
    def update(self, images: list, prompts: list[str]) -> None:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        image = nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
        text = nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)
        self.scores += (image * text).sum(-1).tolist()
