"""A CLIP model with its tokenizer and image preprocessing, shared by the CLIP-based rewards.

Images are preprocessed in torch from the processor's own settings (shortest-edge bicubic resize,
centre crop, mean/std normalisation) instead of by the processor itself: transformers 5 picks a
torchvision backend when torchvision is installed and a PIL one otherwise, which would make a
score depend on the environment; in torch it is one code path on the images' device. It follows
the PIL path (the reference scorers convert to 8-bit PIL images): images are quantised to 8-bit
levels first and after each of the two resize passes, and the result matches the PIL processor
to within one 8-bit level per pixel (tests/test_rewards_real.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


class ClipEncoder:
    """``transformers.CLIPModel`` at ``path``; tokenizer and image settings from ``processor_path``
    (default ``path``). ``device``: where the model runs (None: on the images' device, moved there
    on the first call); ``dtype``: float32, bfloat16 or float16."""

    def __init__(self, path: str, processor_path: str | None = None, device: str | None = None, dtype: str = "float32") -> None:
        from transformers import CLIPModel, CLIPProcessor

        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device) if device is not None else None
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).eval().requires_grad_(False)
        if self.device is not None:
            self.model.to(self.device)
        processor = CLIPProcessor.from_pretrained(processor_path or path)
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        size, crop = dict(ip.size), (dict(ip.crop_size) if ip.do_center_crop else None)
        if "shortest_edge" not in size and not {"height", "width"} <= set(size):
            raise ValueError(f"{processor_path or path}: unsupported image processor size {size} (expected shortest_edge or height/width)")
        self.size, self.crop = size, crop
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def _to(self, device: torch.device) -> torch.device:
        target = self.device or device
        if self.model.logit_scale.device != target:
            self.model.to(target)
        return target

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images float [B, 3, H, W] in [0, 1] -> pixel values float32 [B, 3, h, w], normalised."""
        x = _quantise(images.float())
        height, width = x.shape[-2:]
        if "shortest_edge" in self.size:
            # The processor's rule: the short side becomes shortest_edge, the long side is truncated.
            short = self.size["shortest_edge"]
            if height <= width:
                new = (short, int(short * width / height))
            else:
                new = (int(short * height / width), short)
        else:
            new = (self.size["height"], self.size["width"])
        # PIL resizes in two passes, horizontal then vertical, rounding and clipping to 8 bits
        # in between; bicubic overshoot on sharp edges makes that clipping matter. antialias=True
        # is torch's PIL-compatible filter (it widens the kernel on downscaling, as PIL does).
        if new[1] != width:
            x = _quantise(F.interpolate(x, size=(height, new[1]), mode="bicubic", align_corners=False, antialias=True))
        if new[0] != height:
            x = _quantise(F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True))
        if self.crop is not None:
            top, left = (new[0] - self.crop["height"]) // 2, (new[1] - self.crop["width"]) // 2
            if top < 0 or left < 0:
                raise ValueError(f"CLIP preprocessing: crop {self.crop} is larger than the resized image {new}")
            x = x[..., top : top + self.crop["height"], left : left + self.crop["width"]]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Images float [B, 3, H, W] in [0, 1] -> unit-norm image embeddings float32 [B, D]."""
        device = self._to(images.device)
        pixels = self.preprocess(images.to(device)).to(self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        """Prompts (B) -> unit-norm text embeddings float32 [B, D]; prompts longer than the text
        encoder's context are truncated, as in the reference scorers."""
        device = self._to(device)
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)
