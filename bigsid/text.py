"""Conditioning and the text encoders of each teacher family.

`Cond` carries whatever a family's network is conditioned on, as per-sample tensors, with the empty prompt's
counterpart beside it: slicing a batch, dropping prompts for the guided fake score and batching the guidance pair
work field by field, the same for every family. Encoders are frozen and called once per batch:

  family   tokens (emb)                                pooled                     mask   size
  sd       CLIP last layer                              -                          -      -
  sdxl     CLIP-L and CLIP-G penultimate, concatenated  CLIP-G projection          -      add_time_ids
  pixart   T5 (max length per model, padded)            -                          T5     resolution, aspect
  sd3      CLIP-L, CLIP-G penultimate (padded to T5's   CLIP-L + CLIP-G            -      -
           width) then T5, along the sequence           projections

The empty prompt is encoded as the family's own pipeline encodes a missing negative prompt: "" through the same
encoders, or zeros where the model's pipeline says so (SDXL's force_zeros_for_empty_prompt).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

log = logging.getLogger("bigsid.text")


@dataclass
class Cond:
    """Conditioning of a batch: emb [B, L, D], and where the family has them pooled [B, P], mask [B, L] (1 for a
    token, 0 for padding) and size [B, K] (size conditioning, the same for every prompt); `uncond` holds the same
    fields for the empty prompt with batch 1."""

    emb: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    size: torch.Tensor | None = None
    uncond: "Cond | None" = None

    def _map(self, fn, other: "Cond | None" = None) -> "Cond":
        """fn(field, uncond's field) on every tensor field; the uncond stays as it is."""
        out = {}
        for f in fields(self):
            if f.name != "uncond":
                x = getattr(self, f.name)
                out[f.name] = None if x is None else fn(x, getattr(other, f.name) if other is not None else None)
        return Cond(**out, uncond=self.uncond)

    def __getitem__(self, index: slice) -> "Cond":
        """The conditioning of a slice of the batch (a rank's share, a micro-batch)."""
        return self._map(lambda x, _: x[index])

    def drop(self, dropped: torch.Tensor) -> "Cond":
        """Replace the prompts where `dropped` [B] is true by the empty prompt (guided fake-score training)."""
        def where(x, u):
            keep = ~dropped.to(x.device).view((-1,) + (1,) * (x.ndim - 1))
            return torch.where(keep, x, u.to(x.dtype))
        return self._map(where, self.uncond)

    def with_uncond(self) -> "Cond":
        """[empty prompt x B; this batch]: both halves of classifier-free guidance in one network call."""
        return self._map(lambda x, u: torch.cat([u.to(x.dtype).expand_as(x), x]), self.uncond)

    def to(self, dtype: torch.dtype) -> "Cond":
        """Floating fields in `dtype` (the mask stays as it is), the uncond too."""
        cast = (lambda x, _: x.to(dtype) if x.is_floating_point() else x)
        out = self._map(cast)
        return replace(out, uncond=self.uncond.to(dtype) if self.uncond is not None else None)


class _Tokens:
    """One tokenizer: fixed-length ids (and mask) for a list of prompts, with a truncation warning said once."""

    def __init__(self, tokenizer, max_length: int, name: str):
        self.tokenizer, self.max_length, self.name = tokenizer, max_length, name
        self.warned = False

    def count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, truncation=False).input_ids)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        # A token is at least one UTF-8 byte (BPE) or one character plus a marker (sentencepiece), so only prompts
        # with more bytes than the limit (less the special tokens) can be too long: tokenize just those again.
        if not self.warned and any(self.count(p) > self.max_length for p in prompts
                                   if len(p.encode()) + 2 > self.max_length):
            log.warning("prompts longer than %d tokens are truncated to the %s limit", self.max_length, self.name)
            self.warned = True
        return out.input_ids, out.attention_mask


class PromptEncoder(nn.Module):
    """Base of the family encoders: frozen text encoders, `uncond` computed once, token counts for the data stream.

    `max_length` and `token_count` describe the encoder whose limit truncates prompts first (the data stream counts
    prompts over it)."""

    def __init__(self, encoders: dict[str, nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleDict({k: m.requires_grad_(False).eval() for k, m in encoders.items()})
        self.uncond: Cond | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def token_count(self, prompt: str) -> int:
        return self.tokens[0].count(prompt)

    @property
    def max_length(self) -> int:
        return self.tokens[0].max_length

    def blocks(self) -> list[nn.Module]:
        """The sharding plan's inner units (text_encoder.shard, parallel.fsdp2.units): each transformer layer of
        every text encoder, CLIP's encoder layers and T5's blocks."""
        return [layer for name, model in self.encoders.items() for layer in _layers(name, model)]

    def stages(self) -> list[nn.Module]:
        """The outer units: each text encoder, holding what its layers leave (token and position embeddings, final
        norm, projection), so that it too is freed after its forward; the root then holds no parameters."""
        return list(self.encoders.values())

    def encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def empty(self) -> Cond:
        return self.encode([""])

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        # the uncond follows the encoder's device and dtype, so it is made on first use rather than at build time
        if self.uncond is None or self.uncond.emb.device != self.device:
            self.uncond = self.empty()
        return replace(self.encode(prompts), uncond=self.uncond)

    def _apply(self, fn, recurse=True):
        self.uncond = None  # moved or cast: encode the empty prompt again where the encoders now are
        return super()._apply(fn, recurse)


def _layers(name: str, model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a transformers CLIP or T5 text encoder, the only kinds the families load: CLIP's
    encoder layers (under `text_model` where the class has a projection) or T5's blocks."""
    stack = getattr(getattr(model, "text_model", model), "encoder", None)
    layers = getattr(stack, "layers", None) or getattr(stack, "block", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"text_encoder.shard: no sharding plan for the {type(model).__name__} of {name} (bigsid "
                         "shards CLIP and T5 text encoders by their layers); set text_encoder.shard=false")
    return list(layers)


def _upload(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token ids (or mask) onto the encoder's device without waiting for it: a copy from pageable host memory queues
    behind every kernel already issued, which would stall each phase on the previous one; pinned, it does not."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def _clip(model: nn.Module, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of `layer` (-1 last, -2 penultimate) and the pooled output (projected where the model has a
    projection: CLIPTextModelWithProjection's text_embeds).

    An inner layer's output is read off that layer by a hook, the tensor output_hidden_states would return: transformers
    finds the layers to record by the model's class name, which fully_shard (text_encoder.shard) replaces."""
    kept = []
    hook = None if layer == -1 else _layers("a CLIP encoder", model)[layer].register_forward_hook(
        lambda module, args, out: kept.append(out[0] if isinstance(out, tuple) else out))
    try:
        out = model(_upload(ids, next(model.parameters()).device))
    finally:
        if hook is not None:
            hook.remove()
    hidden = out.last_hidden_state if layer == -1 else kept[0]
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return hidden, pooled


class CLIPPromptEncoder(PromptEncoder):
    """SD 1.x/2.x: one CLIP text encoder, last layer."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__({"clip": text_encoder})
        self.tokens = [_Tokens(tokenizer, tokenizer.model_max_length, "CLIP text encoder's")]

    def encode(self, prompts: list[str]) -> Cond:
        return Cond(_clip(self.encoders["clip"], self.tokens[0](prompts)[0], -1)[0])


class SDXLPromptEncoder(PromptEncoder):
    """SDXL: CLIP-L and CLIP-G penultimate layers side by side, CLIP-G's projection pooled, and add_time_ids
    (original size, crop top-left, target size; pixels) for the training resolution."""

    def __init__(self, tokenizers: list, text_encoders: list[nn.Module], height: int, width: int,
                 zeros_for_empty: bool):
        super().__init__({"clip_l": text_encoders[0], "clip_g": text_encoders[1]})
        self.tokens = [_Tokens(t, t.model_max_length, "CLIP text encoders'") for t in tokenizers]
        self.register_buffer("time_ids", torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32),
                             persistent=False)
        self.zeros_for_empty = zeros_for_empty

    def encode(self, prompts: list[str]) -> Cond:
        h_l, _ = _clip(self.encoders["clip_l"], self.tokens[0](prompts)[0], -2)
        h_g, pooled = _clip(self.encoders["clip_g"], self.tokens[1](prompts)[0], -2)
        return Cond(torch.cat([h_l, h_g], -1), pooled=pooled, size=self.time_ids.expand(len(prompts), -1))

    def empty(self) -> Cond:
        cond = self.encode([""])
        if self.zeros_for_empty:  # the pipeline's default negative: zero embeddings, not the encoded ""
            cond = replace(cond, emb=torch.zeros_like(cond.emb), pooled=torch.zeros_like(cond.pooled))
        return cond


class T5PromptEncoder(PromptEncoder):
    """PixArt-alpha/Sigma: T5 with its attention mask, padded to the model's maximum length (120 / 300 tokens);
    `size` = (height, width, aspect ratio) for the transformers that take resolution conditioning."""

    def __init__(self, tokenizer, text_encoder: nn.Module, max_length: int, size: tuple[int, int] | None = None):
        super().__init__({"t5": text_encoder})
        self.tokens = [_Tokens(tokenizer, max_length, "T5 encoder's")]
        self.register_buffer("size", None if size is None else torch.tensor([[size[0], size[1], size[0] / size[1]]]),
                             persistent=False)

    def encode(self, prompts: list[str]) -> Cond:
        # PixArt's pipelines lowercase and strip every prompt (clean_caption=False) or clean it further (True):
        # the captions the teacher learned were lowercase
        ids, mask = self.tokens[0]([p.lower().strip() for p in prompts])
        t5 = self.encoders["t5"]
        mask = _upload(mask, self.device)
        emb = t5(_upload(ids, self.device), attention_mask=mask).last_hidden_state
        size = None if self.size is None else self.size.expand(len(prompts), -1)
        return Cond(emb, mask=mask, size=size)


class SD3PromptEncoder(PromptEncoder):
    """SD3/SD3.5: CLIP-L and CLIP-G penultimate layers side by side, zero-padded to T5's width, followed by T5's
    tokens along the sequence; pooled = both CLIP projections. SD3's transformer takes no mask."""

    def __init__(self, tokenizers: list, text_encoders: list[nn.Module], t5_max_length: int):
        super().__init__({"clip_l": text_encoders[0], "clip_g": text_encoders[1], "t5": text_encoders[2]})
        self.tokens = [_Tokens(tokenizers[0], tokenizers[0].model_max_length, "CLIP text encoders'"),
                       _Tokens(tokenizers[1], tokenizers[1].model_max_length, "CLIP text encoders'"),
                       _Tokens(tokenizers[2], t5_max_length, "T5 encoder's")]

    def encode(self, prompts: list[str]) -> Cond:
        h_l, p_l = _clip(self.encoders["clip_l"], self.tokens[0](prompts)[0], -2)
        h_g, p_g = _clip(self.encoders["clip_g"], self.tokens[1](prompts)[0], -2)
        t5 = self.encoders["t5"](_upload(self.tokens[2](prompts)[0], self.device)).last_hidden_state
        clip = torch.cat([h_l, h_g], -1)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Cond(torch.cat([clip, t5.to(clip.dtype)], -2), pooled=torch.cat([p_l, p_g], -1))
