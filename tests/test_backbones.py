"""The offline backbone really is ImageNet-pretrained, and missing weights fail clearly."""

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from vadlab.backbones import FeatureExtractor, WeightsUnavailableError, create_backbone, fuse_batchnorm


def _photo(name: str) -> torch.Tensor:
    img = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(img, size=224, mode="bilinear", antialias=True)


@pytest.mark.parametrize("photo, imagenet_class", [("chelsea", 285), ("coffee", 967)])
def test_lite0_classifies_photos(photo, imagenet_class):
    model = create_backbone("efficientnet_lite0")
    with torch.no_grad():
        logits = model((_photo(photo) - 0.5) / 0.5)
    assert logits.argmax().item() == imagenet_class  # Egyptian cat, espresso


def test_random_weights_only_when_asked():
    pretrained = create_backbone("efficientnet_lite0")
    random = create_backbone("efficientnet_lite0", weights="random")
    assert not torch.equal(pretrained.conv_stem.weight, random.conv_stem.weight)


def test_feature_extractor_shapes_and_frozen():
    fe = FeatureExtractor("efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"))
    feats = fe(torch.rand(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == fe.channels == [24, 40, 112]
    assert [64 // f.shape[-1] for f in feats] == fe.strides == [4, 8, 16]
    assert not any(p.requires_grad for p in fe.parameters())
    fe.train()
    assert not fe.training  # batch-norm statistics of a frozen backbone never move


def test_feature_extractor_matches_full_model():
    full = create_backbone("efficientnet_lite0")
    fe = FeatureExtractor("efficientnet_lite0", ("blocks.2",))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        h = full.bn1(full.conv_stem(fe.normalize(x)))
        for block in full.blocks[:3]:
            h = block(h)
        ours = fe(x)[0]
    # the frozen extractor has its batch norms folded into its convolutions: the same function, rounded
    # differently (a wrong or missing weight would be off by far more than 1e-5 of the features' scale)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fe.modules())
    assert float((ours - h).abs().max()) <= 1e-5 * float(h.abs().max())


def test_batchnorm_folding_keeps_the_function_and_leaves_trainable_extractors_alone():
    frozen = FeatureExtractor("efficientnet_lite0", ("blocks.2",))
    trainable = FeatureExtractor("efficientnet_lite0", ("blocks.2",), trainable=True).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trainable.modules())
    x = torch.rand(3, 3, 96, 80)
    with torch.no_grad():
        a, b = frozen(x)[0], trainable(x)[0]
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    # folding by hand: a conv followed by a batch norm, the fold equals the pair
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    pair = torch.nn.Sequential(conv, bn).eval()
    reference = pair(x).detach()
    assert fuse_batchnorm(pair) == 1 and isinstance(pair[1], torch.nn.Identity)
    assert torch.allclose(pair(x), reference, atol=1e-5)


def test_frozen_extractor_runs_channels_last_and_returns_contiguous_float32():
    fe = FeatureExtractor("efficientnet_lite0", ("blocks.1", "blocks.2"))
    conv = next(m for m in fe.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    feats = fe(torch.rand(2, 3, 64, 64))
    assert all(f.dtype == torch.float32 and f.is_contiguous() for f in feats)
    assert feats[0].view(2, 24, -1).shape == (2, 24, 256)  # plain reshapes work on what methods receive
    double = FeatureExtractor("efficientnet_lite0", ("blocks.1",)).double()(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    assert double[0].dtype == torch.float64  # a float64 gradient check stays in float64


def test_bfloat16_backbone_matches_float32_within_its_rounding():
    """bfloat16 keeps 8 mantissa bits: about 0.4 % per operation, a few per cent after a dozen blocks.
    The features must agree within 6 % (relative Frobenius norm, each layer) and correlate above 0.998
    per image; a wrong cast (float16 overflow, features left in bfloat16) or other weights break it."""
    layers = ("blocks.1", "blocks.2", "blocks.4")
    exact = FeatureExtractor("efficientnet_lite0", layers)
    fast = FeatureExtractor("efficientnet_lite0", layers, precision="bfloat16")
    x = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = exact(x), fast(x)
    for u, v in zip(a, b):
        assert v.dtype == torch.float32 and v.shape == u.shape
        assert float((v - u).norm() / u.norm()) < 0.06
        for ui, vi in zip(u.flatten(1), v.flatten(1)):
            assert float(torch.corrcoef(torch.stack([ui, vi]))[0, 1]) > 0.998
        assert not torch.equal(u, v)  # the option really changes the arithmetic
    assert exact.identity() != fast.identity()  # the feature cache keeps the two apart
    with pytest.raises(ValueError, match="precision must be one of"):
        FeatureExtractor("efficientnet_lite0", layers, precision="float16")
    with pytest.raises(ValueError, match="trainable backbone runs in float32"):
        FeatureExtractor("efficientnet_lite0", layers, trainable=True, precision="bfloat16")


def test_methods_pass_the_backbone_precision_on():
    from vadlab.methods import get_method

    for name in ("padim", "semi_orthogonal", "patchcore", "cflow"):
        model = get_method(name)(backbone_precision="bfloat16")
        assert model.backbone.precision == "bfloat16", name
        assert get_method(name)().backbone.precision == "float32", name


def test_bad_layer_and_backbone_names():
    with pytest.raises(ValueError, match="blocks.9"):
        FeatureExtractor("efficientnet_lite0", ("blocks.9",))
    with pytest.raises(ValueError, match="unknown backbone"):
        FeatureExtractor("resnet9000")


def test_local_weights_file(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(create_backbone("efficientnet_lite0").state_dict(), path)
    a = FeatureExtractor("efficientnet_lite0", weights=str(path))
    b = FeatureExtractor("efficientnet_lite0")
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(a(x)[0], b(x)[0])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FeatureExtractor("efficientnet_lite0", weights=str(tmp_path / "missing.pth"))


def test_paper_backbone_offline_error_names_alternative(monkeypatch, tmp_path):
    """Without a cached file and without network, the error names the offline alternative."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    weights = torchvision.models.get_model_weights("resnet18").IMAGENET1K_V1
    monkeypatch.setattr(type(weights), "get_state_dict", no_network)
    with pytest.raises(WeightsUnavailableError, match="efficientnet_lite0"):
        FeatureExtractor("resnet18")


def test_paper_backbone_from_cache(monkeypatch, tmp_path):
    """A torchvision checkpoint in the hub cache is used without any download."""
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    tv = torchvision.models.resnet18()
    (tmp_path / "checkpoints").mkdir()
    torch.save(tv.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    fe = FeatureExtractor("resnet18", ("layer1", "layer2"))
    tv.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(fe.normalize(x)))))))
        np.testing.assert_allclose(fe(x)[1].numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_vgg16_feature_layers_copy_weights(tmp_path):
    """timm flattens VGG's module names in its feature net; every weight must still be copied."""
    full = create_backbone("vgg16", weights="random")
    torch.save(full.state_dict(), tmp_path / "vgg.pth")
    fe = FeatureExtractor("vgg16", weights=str(tmp_path / "vgg.pth"))
    assert fe.channels == [128, 256, 512]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = full.features[:23](fe.normalize(x))  # up to the ReLU after conv4_3 (timm's features.22)
        np.testing.assert_allclose(fe(x)[2].numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)
