"""CLIP featurizer: weight resolution, input adaptation and bad inputs."""

import matplotlib.cbook
import open_clip
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from conftest import TINY_MODEL
from jps_domainbed.clip_featurizer import (IMAGENET_MEAN, IMAGENET_STD,
                                           CLIPFeaturizer, CLIPSpec,
                                           PretrainedWeightsNotFoundError,
                                           build_clip_featurizer,
                                           load_clip_model, resolve_weights)


def hopper_image():
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        return Image.open(handle).convert("RGB")


def tiny_model(image_size=64, seed=0):
    torch.manual_seed(seed)
    return load_clip_model(CLIPSpec(TINY_MODEL, pretrained="none", image_size=image_size))


def test_imagenet_input_matches_open_clip_preprocess():
    model = tiny_model(image_size=64).eval()
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = open_clip.image_transform(64, is_train=False, mean=preprocess_cfg["mean"],
                                           std=preprocess_cfg["std"])
    clip_input = preprocess(hopper_image()).unsqueeze(0)
    expected = model.encode_image(clip_input)

    # The same pixels, normalized the way DomainBed normalizes its datasets.
    pixels = clip_input * torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1) \
        + torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
    domainbed_input = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(pixels)
    featurizer = CLIPFeaturizer((3, 64, 64), model, CLIPSpec(TINY_MODEL, "none", 64)).eval()

    features = featurizer(domainbed_input)
    assert features.shape == (1, featurizer.n_outputs) == (1, 32)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_domainbed_transform_at_other_size_is_resized():
    model = tiny_model(image_size=32).eval()
    domainbed_transform = T.Compose([T.Resize((224, 224)), T.ToTensor(),
                                     T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = domainbed_transform(hopper_image()).unsqueeze(0)
    featurizer = CLIPFeaturizer((3, 224, 224), model, CLIPSpec(TINY_MODEL, "none", 32)).eval()

    pixels = T.Resize((224, 224))(T.ToTensor()(hopper_image())).unsqueeze(0)
    pixels = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear",
                                             align_corners=False, antialias=True)
    clip_input = T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)(pixels)
    torch.testing.assert_close(featurizer(x), model.encode_image(clip_input), atol=1e-3, rtol=1e-3)


def test_rotated_mnist_input_repeats_gray():
    model = tiny_model(image_size=32).eval()
    featurizer = CLIPFeaturizer((1, 28, 28), model, CLIPSpec(TINY_MODEL, "none", 32)).eval()
    digits = torch.rand(4, 1, 28, 28)

    adapted = featurizer.adapter(digits)
    assert adapted.shape == (4, 3, 32, 32)
    gray = torch.nn.functional.interpolate(digits, size=(32, 32), mode="bilinear", align_corners=False)
    for channel in range(3):
        expected = (gray[:, 0] - open_clip.OPENAI_DATASET_MEAN[channel]) / open_clip.OPENAI_DATASET_STD[channel]
        torch.testing.assert_close(adapted[:, channel], expected)


def test_colored_mnist_input_has_empty_blue():
    model = tiny_model(image_size=32).eval()
    featurizer = CLIPFeaturizer((2, 28, 28), model, CLIPSpec(TINY_MODEL, "none", 32)).eval()
    digits = torch.rand(2, 2, 28, 28)
    adapted = featurizer.adapter(digits)
    blue = torch.full_like(adapted[:, 2], -open_clip.OPENAI_DATASET_MEAN[2] / open_clip.OPENAI_DATASET_STD[2])
    torch.testing.assert_close(adapted[:, 2], blue)
    assert featurizer(digits).shape == (2, 32)


def test_unsupported_input_shape_rejected():
    with pytest.raises(ValueError, match=r"input_shape \(4, 28, 28\) is not supported"):
        CLIPFeaturizer((4, 28, 28), tiny_model(32), CLIPSpec(TINY_MODEL, "none", 32))


def test_weights_file_is_loaded(tmp_path):
    source = tiny_model(image_size=32, seed=5)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)

    spec = CLIPSpec(TINY_MODEL, pretrained=str(path), image_size=32)
    featurizer, _ = build_clip_featurizer((3, 32, 32), spec)
    for name, param in source.visual.named_parameters():
        assert torch.equal(param, dict(featurizer.visual.named_parameters())[name]), name


def test_missing_weights_file_named(tmp_path):
    path = tmp_path / "absent" / "ViT-B-16.pt"
    with pytest.raises(PretrainedWeightsNotFoundError, match=str(path)):
        resolve_weights(CLIPSpec("ViT-B-16", pretrained=str(path)))
    with pytest.raises(PretrainedWeightsNotFoundError, match="weights_file .* does not exist"):
        resolve_weights(CLIPSpec("ViT-B-16", "openai", weights_file=str(path)))


def test_missing_tag_weights_offline_explains(tmp_path):
    spec = CLIPSpec("ViT-B-16", "openai", cache_dir=str(tmp_path), download=False)
    with pytest.raises(PretrainedWeightsNotFoundError) as error:
        resolve_weights(spec)
    message = str(error.value)
    assert "'ViT-B-16'" in message
    assert "'openai'" in message
    assert str(tmp_path) in message
    assert "weights_file" in message


def test_offline_environment_disables_download(tmp_path, monkeypatch):
    monkeypatch.setenv("JPS_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsNotFoundError, match="downloading is off"):
        load_clip_model(CLIPSpec("ViT-B-16", "openai", cache_dir=str(tmp_path)))


def test_cached_tag_weights_are_found(tmp_path):
    url = open_clip.get_pretrained_cfg("ViT-B-16", "openai")["url"]
    cached = tmp_path / url.rsplit("/", 1)[1]
    cached.write_bytes(b"placeholder")
    path, tag_config = resolve_weights(CLIPSpec("ViT-B-16", "openai", cache_dir=str(tmp_path),
                                                download=False))
    assert path == str(cached)
    assert tag_config["quick_gelu"] is True


def test_unknown_model_name_rejected():
    with pytest.raises(ValueError, match="unknown open_clip model name 'ViT-B-61'"):
        load_clip_model(CLIPSpec("ViT-B-61", "none"))


def test_unknown_tag_rejected():
    with pytest.raises(ValueError, match="unknown pretrained tag 'opnai'.*'openai'"):
        load_clip_model(CLIPSpec("ViT-B-16", "opnai"))


def test_image_size_not_multiple_of_patch_rejected():
    with pytest.raises(ValueError, match="image_size=100 is not a multiple of the patch size 16"):
        load_clip_model(CLIPSpec("ViT-B-16", "none", image_size=100))
