"""CLIP image featurizer on open_clip, with DomainBed input adaptation.

Three concerns stay apart, as in open_clip: ``resolve_weights`` decides which
weights to load, ``load_clip_model`` builds the architecture, and
``InputAdapter`` turns DomainBed tensors into what the CLIP model expects.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import open_clip

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

# DomainBed normalizes its image datasets with these ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RANDOM_INIT_VALUES = ("none", "random", "")
WEIGHT_FILE_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class PretrainedWeightsNotFoundError(FileNotFoundError):
    """Requested pretrained CLIP weights are not on this machine."""


@dataclass(frozen=True)
class CLIPSpec:
    """Description of the CLIP encoder to build and where its weights come from.

    model_name: an open_clip architecture, such as "ViT-B-16".
    pretrained: an open_clip pretrained tag ("openai"), a path to a weights
        file, or "none" for random initialization (never a silent fallback).
    image_size: input resolution of the encoder, in pixels.
    weights_file: a local weights file for the tag, used instead of the cache.
    cache_dir: where open_clip caches downloads (default: its own).
    download: try to download missing weights; when False only local files
        are used.
    """

    model_name: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    image_size: int = 224
    weights_file: Optional[str] = None
    cache_dir: Optional[str] = None
    download: bool = True

    @property
    def is_random_init(self) -> bool:
        return self.weights_file is None and (
            self.pretrained is None or str(self.pretrained).lower() in RANDOM_INIT_VALUES)

    def to_dict(self):
        return asdict(self)


def downloads_allowed() -> bool:
    """False when JPS_OFFLINE or HF_HUB_OFFLINE is set to a true value."""
    for variable in ("JPS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    return True


def check_model_name(model_name: str) -> dict:
    """Return the open_clip config of ``model_name``; raise ValueError if unknown."""
    config = open_clip.get_model_config(model_name)
    if config is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
        raise ValueError(
            f"unknown open_clip model name {model_name!r}; close matches: {close}. "
            "open_clip.list_models() lists all names, and a custom architecture "
            "can be added with open_clip.add_model_config(JSON_FILE)")
    return config


def check_image_size(model_name: str, image_size: int) -> None:
    """Raise ValueError unless the patch size divides ``image_size``."""
    vision = check_model_name(model_name)["vision_cfg"]
    patch = vision.get("patch_size")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if patch and image_size % patch:
        lower = image_size - image_size % patch
        raise ValueError(
            f"image_size={image_size} is not a multiple of the patch size {patch} "
            f"of {model_name}; use {lower} or {lower + patch}")


def resolve_weights(spec: CLIPSpec) -> Tuple[Optional[str], dict]:
    """Return (local weights file or None, pretrained config of the tag).

    The file is None for random initialization, and also when the tag's
    weights are not cached but downloading is allowed (open_clip then
    downloads them). Raises PretrainedWeightsNotFoundError when the weights
    are needed, not on disk, and downloads are off; ValueError for an unknown
    tag.
    """
    if spec.is_random_init:
        return None, {}

    pretrained = str(spec.pretrained) if spec.pretrained is not None else ""
    if spec.weights_file is None and _looks_like_path(pretrained):
        if not os.path.isfile(pretrained):
            raise PretrainedWeightsNotFoundError(
                f"CLIP weights file {pretrained!r} for {spec.model_name} does not "
                "exist; give the path of a downloaded open_clip checkpoint")
        return pretrained, {}

    tag_config = {}
    if pretrained and pretrained.lower() not in RANDOM_INIT_VALUES:
        tag_config = open_clip.get_pretrained_cfg(spec.model_name, pretrained)
        if not tag_config:
            tags = open_clip.list_pretrained_tags_by_model(spec.model_name)
            close = difflib.get_close_matches(pretrained, tags, n=3)
            raise ValueError(
                f"unknown pretrained tag {pretrained!r} for {spec.model_name}; close "
                f"matches: {close}, known tags: {tags}. Use pretrained='none' for "
                "random weights or a file path")

    if spec.weights_file is not None:
        if not os.path.isfile(spec.weights_file):
            raise PretrainedWeightsNotFoundError(
                f"weights_file {spec.weights_file!r} for {spec.model_name} "
                f"(tag {pretrained!r}) does not exist; give the path of the downloaded "
                "open_clip checkpoint, or leave it empty to use open_clip's cache")
        return spec.weights_file, tag_config

    searched: List[str] = []
    found = _find_cached_weights(tag_config, spec.cache_dir, searched)
    if found:
        return found, tag_config
    if spec.download and downloads_allowed():
        return None, tag_config
    raise PretrainedWeightsNotFoundError(
        f"pretrained weights for model {spec.model_name!r} with tag {pretrained!r} "
        f"were not found on this machine (looked in: {', '.join(searched)}) and "
        "downloading is off. Download them on a machine with network access "
        "(open_clip.create_model(model, pretrained=tag) fills the cache), then "
        "copy the file here and pass it as weights_file (hparam 'clip_weights_file') "
        "or point cache_dir at the cache; use pretrained='none' only if you "
        "want random weights")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _find_cached_weights(tag_config: dict, cache_dir: Optional[str], searched: List[str]) -> Optional[str]:
    """Look for a tag's weights in the Hugging Face cache and open_clip's URL cache."""
    hub_entry = tag_config.get("hf_hub", "")
    if hub_entry:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub_entry.rstrip("/")) if not hub_entry.endswith("/") \
            else (hub_entry.rstrip("/"), "")
        for name in ([filename] if filename else WEIGHT_FILE_NAMES):
            searched.append(f"Hugging Face cache {cache_dir or 'default'}: {repo_id}/{name}")
            path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(path, str) and os.path.isfile(path):
                return path
    url = tag_config.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        searched.append(path)
        if os.path.isfile(path):
            return path
    return None


def load_clip_model(spec: CLIPSpec) -> nn.Module:
    """Build the open_clip model of ``spec`` with its weights.

    Raises ValueError for an unknown model, tag or image size, and
    PretrainedWeightsNotFoundError when requested weights are unavailable.
    """
    check_image_size(spec.model_name, spec.image_size)
    weights, tag_config = resolve_weights(spec)
    quick_gelu = bool(tag_config.get("quick_gelu", False))

    if spec.is_random_init:
        logger.warning("building %s with RANDOM weights (pretrained=%r was requested)",
                       spec.model_name, spec.pretrained)
        return open_clip.create_model(spec.model_name, pretrained=None,
                                      force_image_size=spec.image_size)

    logger.info("loading %s weights %s", spec.model_name, weights or f"tag {spec.pretrained!r}")
    try:
        model = open_clip.create_model(
            spec.model_name,
            pretrained=weights or spec.pretrained,
            force_image_size=spec.image_size,
            force_quick_gelu=quick_gelu,
            cache_dir=spec.cache_dir,
            require_pretrained=True,
        )
    except RuntimeError as error:
        if weights is not None:
            raise
        raise PretrainedWeightsNotFoundError(
            f"downloading pretrained weights for {spec.model_name!r} tag "
            f"{spec.pretrained!r} failed ({error}). On a machine without network "
            "access, copy the weights file and pass it as weights_file "
            "(hparam 'clip_weights_file')") from error
    if tag_config:
        open_clip.set_model_preprocess_cfg(model, {
            **open_clip.get_model_preprocess_cfg(model),
            "mean": tuple(tag_config.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": tuple(tag_config.get("std", open_clip.OPENAI_DATASET_STD)),
        })
    return model


class InputAdapter(nn.Module):
    """Map DomainBed inputs to CLIP's input space.

    3-channel inputs are DomainBed image tensors normalized with ImageNet
    statistics; they are mapped to CLIP's normalization with
    ``x_clip = (x * std_in + mean_in - mean_clip) / std_clip``.
    1-channel (RotatedMNIST) and 2-channel (ColoredMNIST, red and green)
    inputs are pixel values in [0, 1]; they become RGB (gray repeated, or red,
    green and a zero blue channel) before CLIP normalization. Inputs whose
    height or width differs from ``image_size`` are resized bilinearly
    (antialiased when shrinking).
    """

    def __init__(self, input_shape: Sequence[int], image_size: int,
                 clip_mean: Sequence[float], clip_std: Sequence[float]):
        super().__init__()
        if len(input_shape) != 3 or input_shape[0] not in (1, 2, 3):
            raise ValueError(
                f"input_shape {tuple(input_shape)} is not supported; the CLIP "
                "featurizer takes (3, H, W) ImageNet-normalized images or "
                "(1, H, W) / (2, H, W) digit images with values in [0, 1]")
        self.channels = int(input_shape[0])
        self.image_size = int(image_size)
        self.register_buffer("clip_mean", torch.tensor(clip_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(clip_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected a batch of shape (N, {self.channels}, H, W), got {tuple(x.shape)}")
        if self.channels == 3:
            pixels = x * self.in_std + self.in_mean
        elif self.channels == 1:
            pixels = x.expand(-1, 3, -1, -1)
        else:
            pixels = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)

        if pixels.shape[-2:] != (self.image_size, self.image_size):
            shrinking = min(pixels.shape[-2:]) > self.image_size
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size),
                                   mode="bilinear", align_corners=False, antialias=shrinking)
        return (pixels - self.clip_mean) / self.clip_std


class CLIPFeaturizer(nn.Module):
    """CLIP image encoder as a DomainBed featurizer.

    ``forward(x)`` returns the image embedding (``n_outputs`` values per
    example); the text tower is not kept.
    """

    def __init__(self, input_shape: Sequence[int], clip_model: nn.Module, spec: CLIPSpec):
        super().__init__()
        preprocess = open_clip.get_model_preprocess_cfg(clip_model)
        self.spec = spec
        self.visual = clip_model.visual
        self.n_outputs = int(self.visual.output_dim)
        self.adapter = InputAdapter(input_shape, spec.image_size,
                                    preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN),
                                    preprocess.get("std", open_clip.OPENAI_DATASET_STD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(self.adapter(x))


def build_clip_featurizer(input_shape: Sequence[int], spec: CLIPSpec) -> Tuple[CLIPFeaturizer, nn.Module]:
    """Return (featurizer, full CLIP model); the model still has its text tower."""
    model = load_clip_model(spec)
    return CLIPFeaturizer(input_shape, model, spec), model


PROMPT_TEMPLATES = ("a photo of a {}.",)


@torch.no_grad()
def zero_shot_head_weights(clip_model: nn.Module, class_names: Sequence[str],
                           templates: Sequence[str] = PROMPT_TEMPLATES,
                           model_name: Optional[str] = None) -> torch.Tensor:
    """Return a (num_classes, embed_dim) matrix of normalized text embeddings.

    Each row is the mean over ``templates`` of the L2-normalized CLIP text
    embedding of "a photo of a {class name}.", normalized again; class names
    have underscores replaced by spaces.
    """
    tokenizer = open_clip.get_tokenizer(model_name) if model_name else open_clip.tokenize
    was_training = clip_model.training
    clip_model.eval()
    rows = []
    for name in class_names:
        prompts = [template.format(name.replace("_", " ")) for template in templates]
        tokens = tokenizer(prompts).to(next(clip_model.parameters()).device)
        embedding = F.normalize(clip_model.encode_text(tokens), dim=-1).mean(dim=0)
        rows.append(F.normalize(embedding, dim=-1))
    clip_model.train(was_training)
    return torch.stack(rows)
