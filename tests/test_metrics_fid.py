"""Frechet distance against scipy; extractors load their own state dicts and refuse bad files."""
import numpy as np
import pytest
import scipy.linalg
import torch

from ldmfast.metrics import (
    FeatureStatistics,
    build_extractor,
    extract_features,
    feature_statistics,
    fid_from_features,
    fid_from_statistics,
    frechet_distance,
    load_extractor,
)


def scipy_frechet(f1, f2):
    """The pytorch-fid formula: scipy's sqrtm of the non-symmetric product."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_identical_feature_sets_are_at_distance_zero():
    f = np.random.default_rng(0).standard_normal((300, 64))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-9)
    # Rank-deficient covariance (fewer samples than dimensions), as for 2048-d features.
    g = np.random.default_rng(1).standard_normal((20, 64))
    assert fid_from_features(g, g) == pytest.approx(0.0, abs=1e-9)


def test_matches_scipy_on_random_features():
    rng = np.random.default_rng(2)
    mixing = rng.standard_normal((32, 32))
    f1 = rng.standard_normal((500, 32)) @ mixing
    f2 = rng.standard_normal((400, 32)) @ mixing * 1.3 + 0.5
    want = scipy_frechet(f1, f2)
    assert fid_from_features(f1, f2) == pytest.approx(want, rel=1e-8)
    np.testing.assert_allclose(feature_statistics(f1)[1].numpy(), np.cov(f1, rowvar=False), rtol=1e-10, atol=1e-10)


def test_streamed_statistics_equal_the_one_shot_ones():
    f1 = np.random.default_rng(3).standard_normal((90, 16))
    f2 = np.random.default_rng(4).standard_normal((70, 16)) + 0.2
    s1, s2 = FeatureStatistics(16), FeatureStatistics(16)
    for chunk in np.array_split(f1, 4):
        s1.update(chunk)
    s2.update(f2)
    assert fid_from_statistics(s1, s2) == pytest.approx(fid_from_features(f1, f2), rel=1e-10)


def test_frechet_distance_checks_shapes():
    with pytest.raises(ValueError, match="expected shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 3)))


@pytest.mark.parametrize("kind,size", [("inception", 40), ("radimagenet", 36)])
def test_extractor_loads_a_state_dict_saved_from_itself(tmp_path, kind, size):
    torch.manual_seed(0)
    model = build_extractor(kind).eval()
    path = tmp_path / f"{kind}.pth"
    state = model.state_dict()
    state["fc.weight"] = torch.zeros(1008, 2048)  # a classifier head in the file is ignored
    torch.save(state, path)
    loaded = load_extractor(kind, path)
    assert loaded.description == f"{kind} features (weights {kind}.pth)"
    x = torch.rand(2, 1, size, size + 4)
    with torch.no_grad():
        want = model(model.prepare(x))
    got = extract_features(loaded, x, batch_size=1)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, want)


def test_extractor_weight_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file given.*nothing is downloaded"):
        load_extractor("inception", None)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_extractor("radimagenet", tmp_path / "absent.pth")
    # The other architecture's weights: a clear mismatch, naming the keys.
    wrong = tmp_path / "resnet.pth"
    torch.save(build_extractor("radimagenet").state_dict(), wrong)
    with pytest.raises(ValueError, match=r"does not match the 'inception' extractor.*missing \(Conv2d_1a_3x3"):
        load_extractor("inception", wrong)
    resnet = build_extractor("radimagenet").state_dict()
    resnet["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(resnet, wrong)
    with pytest.raises(ValueError, match=r"1 with a wrong shape \(conv1.weight\)"):
        load_extractor("radimagenet", wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_extractor("inception", garbage)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 100)
    with pytest.raises(ValueError, match="cannot read"):
        load_extractor("inception", damaged)
    with pytest.raises(ValueError, match="kind"):
        load_extractor("vgg", garbage)
