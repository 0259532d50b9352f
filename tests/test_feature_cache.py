"""The frozen-backbone feature cache: same features as a fresh forward pass, keyed by what they depend on."""

import torch

from vadlab.backbones import FeatureExtractor, active_feature_cache, use_feature_cache
from vadlab.methods.padim import Padim


def extractor(layers=("blocks.1", "blocks.2")):
    fx = FeatureExtractor("efficientnet_lite0", layers)
    fx.cache_features = True
    return fx


def test_cached_features_equal_a_fresh_forward_pass_and_are_reused(tmp_path):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fx = extractor()
    fresh = [f.clone() for f in fx.body(fx.normalize(images))]
    cache = use_feature_cache(tmp_path)
    try:
        first = fx(images)
        assert (cache.hits, cache.misses) == (0, 3)
        second = extractor()(images)  # another instance with the same weights: same identity
        assert (cache.hits, cache.misses) == (3, 3)
        for a, b, c in zip(fresh, first, second):
            assert torch.equal(a, b) and torch.equal(a, c)
        # a layer the first extractor did not store is computed; the shared one stays cached per image
        deeper = extractor(("blocks.2", "blocks.4"))(images)
        assert cache.misses == 6 and torch.equal(deeper[0], fresh[1])
        assert len(list(tmp_path.glob("*/*.pt"))) == 3 * 3  # images x distinct layers
    finally:
        use_feature_cache(None)


def test_a_changed_image_other_weights_or_gradients_are_not_served_from_the_cache(tmp_path):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fx = extractor()
    cache = use_feature_cache(tmp_path)
    try:
        fx(images)
        changed = images.clone()
        changed[1, 0, 5, 5] += 1e-3  # one pixel of one image
        out = fx(changed)
        assert (cache.hits, cache.misses) == (1, 3)  # image 0 reused, image 1 re-embedded
        # recomputed alone, not in a batch of two: equal up to the rounding of another batch size
        assert torch.allclose(out[0][1], fx.body(fx.normalize(changed))[0][1], rtol=1e-5, atol=1e-4)
        assert not torch.allclose(out[0][1], fx.body(fx.normalize(images))[0][1], rtol=1e-5, atol=1e-4)
        other = extractor()
        with torch.no_grad():
            other.body.conv_stem.weight.mul_(2.0)
        other(images)
        assert cache.misses == 5  # other weights: another key
        needs_grad = images.clone().requires_grad_(True)
        before = (cache.hits, cache.misses)
        fx(needs_grad)[0].sum().backward()
        assert (cache.hits, cache.misses) == before and needs_grad.grad is not None
        off = FeatureExtractor("efficientnet_lite0", ("blocks.1",))  # cache_features not set
        off(images)
        assert (cache.hits, cache.misses) == before
    finally:
        use_feature_cache(None)


def test_the_cache_stays_under_its_bound(tmp_path):
    fx = extractor(("blocks.1",))
    one = fx.body(fx.normalize(torch.rand(1, 3, 64, 64)))[0][0].numel() * 4
    cache = use_feature_cache(tmp_path, max_bytes=int(5.5 * one))
    try:
        for seed in range(10):
            fx(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
        total = sum(f.stat().st_size for f in tmp_path.glob("*/*.pt"))
        assert total <= cache.max_bytes and 2 <= len(list(tmp_path.glob("*/*.pt"))) <= 5
    finally:
        use_feature_cache(None)


def test_environment_variable_turns_it_on_and_padim_is_unchanged_by_it(tmp_path, monkeypatch):
    train = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    test = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    plain = Padim().fit([train])
    reference = plain.predict(test)
    monkeypatch.setenv("VADLAB_FEATURE_CACHE", str(tmp_path))
    use_feature_cache(None)
    try:
        assert active_feature_cache() is not None
        for _ in range(2):  # fills the cache, then reads it
            cached = Padim().fit([train]).predict(test)
            assert torch.allclose(cached[0], reference[0], rtol=1e-5) and torch.allclose(cached[1], reference[1],
                                                                                          rtol=1e-5, atol=1e-6)
        assert active_feature_cache().hits >= 8
    finally:
        use_feature_cache(None)
        monkeypatch.delenv("VADLAB_FEATURE_CACHE")
        use_feature_cache(None)
