"""vadlab.peers without anomalib (CI does not install it): the missing-library error, the settings mapping,
the side-by-side table, the memory probe, and the pipeline stage's skip path."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vadlab import peers
from vadlab.methods.cflow import CFlowConfig
from vadlab.methods.padim import PadimConfig
from vadlab.methods.patchcore import PatchCoreConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_anomalib(monkeypatch):
    """Make ``import anomalib`` fail as it does where anomalib is not installed."""
    for name in [n for n in sys.modules if n == "anomalib" or n.startswith("anomalib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "anomalib", None)  # None in sys.modules: ImportError on import


def test_missing_anomalib_error_names_the_pinned_install_command(no_anomalib):
    with pytest.raises(peers.AnomalibMissingError, match=re.escape("pip install anomalib==2.7.0")):
        peers.require_anomalib()
    assert not peers.anomalib_available()
    images = torch.rand(2, 3, 32, 32)
    # every entry point that needs anomalib fails with the same message before doing any work
    for call in (lambda: peers.run_anomalib("padim", images, images, {}),
                 lambda: peers.anomalib_padim(images, images, ["blocks.1"], 4, 1.0),
                 lambda: peers.anomalib_patchcore(images, images, ["blocks.2"], 0.1, 9, 1.0),
                 lambda: peers.anomalib_cflow(images, images, ["blocks.2"], 2, 8, 1.9, 64, 1e-3, 1)):
        with pytest.raises(ImportError, match=re.escape(peers.INSTALL_HINT)):
            call()


def test_peer_settings_copy_vadlab_config_at_image_size():
    padim = peers.peer_settings("padim", PadimConfig(n_features=60, sigma=4.0), image_size=128)
    assert padim == {"layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 60, "sigma": 2.0}
    core = peers.peer_settings("patchcore", PatchCoreConfig(coreset_ratio=0.01), image_size=256)
    assert core["coreset_ratio"] == 0.01 and core["num_neighbors"] == 9 and core["sigma"] == 4.0
    assert core["layers"] == ["blocks.2", "blocks.4"]
    # the official code's plain maximum is anomalib's num_neighbors = 1
    assert peers.peer_settings("patchcore", PatchCoreConfig(image_score="max"), 128)["num_neighbors"] == 1
    flow = peers.peer_settings("cflow", CFlowConfig(meta_epochs=3, sub_epochs=2, coupling_blocks=4,
                                                    condition_channels=64, lr=1e-3), 128)
    assert flow["epochs"] == 6 and flow["coupling_blocks"] == 4 and flow["condition_vector"] == 64
    assert flow["fiber_batch_size"] == 256 and flow["lr"] == 1e-3 and flow["clamp_alpha"] == 1.9


def test_peer_settings_refuse_what_anomalib_cannot_express():
    with pytest.raises(ValueError, match="patch_size=5"):
        peers.peer_settings("patchcore", PatchCoreConfig(patch_size=5), 128)
    with pytest.raises(ValueError, match="resnet18"):
        peers.peer_settings("padim", PadimConfig(backbone="resnet18", layers=("layer1",)), 128)
    with pytest.raises(ValueError, match="no counterpart of 'riad'"):
        peers.peer_settings("riad", PadimConfig(), 128)


def _record(method, category, library, auroc, fit, infer, mem):
    return {"method": method, "category": category, "library": library, "image_auroc": auroc,
            "pixel_auroc": auroc - 0.01, "aupro": auroc - 0.1, "fit_seconds": fit, "infer_ms_per_image": infer,
            "peak_memory_mb": mem}


def test_comparison_table_diffs_ratios_means_and_order():
    records = [
        _record("patchcore", "screw", "vadlab", 0.90, 10.0, 20.0, 100.0),
        _record("patchcore", "screw", "anomalib", 0.80, 30.0, 10.0, 300.0),
        _record("patchcore", "brick", "anomalib", 0.95, 20.0, 40.0, 100.0),
        _record("patchcore", "brick", "vadlab", 0.85, 10.0, 20.0, 200.0),
        _record("padim", "screw", "vadlab", 0.70, 5.0, 5.0, 50.0),
        _record("padim", "screw", "anomalib", 0.70, 10.0, 15.0, 25.0),
    ]
    table = peers.comparison_table(records)
    # first-seen order of methods and categories, a mean row after each method's categories
    assert list(zip(table["method"], table["category"])) == [
        ("patchcore", "screw"), ("patchcore", "brick"), ("patchcore", "mean"), ("padim", "screw"), ("padim", "mean")]
    row = table.set_index(["method", "category"])
    assert row.loc[("patchcore", "screw"), "image_auroc_diff"] == pytest.approx(0.10)  # vadlab - anomalib
    assert row.loc[("patchcore", "brick"), "image_auroc_diff"] == pytest.approx(-0.10)
    assert row.loc[("patchcore", "screw"), "fit_seconds_ratio"] == pytest.approx(3.0)  # anomalib / vadlab
    assert row.loc[("patchcore", "screw"), "infer_ms_per_image_ratio"] == pytest.approx(0.5)
    assert row.loc[("patchcore", "brick"), "peak_memory_mb_ratio"] == pytest.approx(0.5)
    assert row.loc[("patchcore", "mean"), "image_auroc_diff"] == pytest.approx(0.0)
    assert row.loc[("patchcore", "mean"), "fit_seconds_ratio"] == pytest.approx(2.5)  # mean of 3 and 2
    assert row.loc[("patchcore", "mean"), "vadlab_fit_seconds"] == pytest.approx(10.0)
    assert row.loc[("padim", "mean"), "infer_ms_per_image_ratio"] == pytest.approx(3.0)
    assert row.loc[("padim", "screw"), "anomalib_aupro"] == pytest.approx(0.6)


def test_comparison_table_rejects_one_sided_records():
    one_sided = [_record("padim", "brick", "vadlab", 0.9, 1.0, 1.0, 1.0)]
    with pytest.raises(ValueError, match="both"):
        peers.comparison_table(one_sided)
    unpaired = one_sided + [_record("padim", "brick", "anomalib", 0.9, 1.0, 1.0, 1.0),
                            _record("padim", "screw", "vadlab", 0.9, 1.0, 1.0, 1.0)]
    with pytest.raises(ValueError, match="screw"):
        peers.comparison_table(unpaired)
    with pytest.raises(ValueError, match="no comparison records"):
        peers.comparison_table([])


def test_result_metrics_scores_with_vadlab_metrics():
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros((4, 8, 8), dtype=np.uint8)
    masks[2:, 2:4, 2:4] = 1
    maps = masks.astype(np.float32) + 0.01 * np.arange(4)[:, None, None]
    result = peers.RunResult("anomalib", "padim", np.array([0.1, 0.2, 0.9, 0.8]), maps, 2.0, 0.005, 10.0)
    row = peers.result_metrics(result, labels, masks)
    assert row["image_auroc"] == 1.0 and row["pixel_auroc"] == 1.0 and row["aupro"] == pytest.approx(1.0)
    assert row["infer_ms_per_image"] == pytest.approx(5.0) and row["fit_seconds"] == 2.0


def test_peak_memory_counts_what_the_block_adds():
    with peers.PeakMemory() as big:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
        del block
    assert big.peak_mb > 48
    with peers.PeakMemory() as small:
        torch.ones(16).sum()
    assert small.peak_mb < 16


def test_stage_without_anomalib_writes_skipped_outputs(no_anomalib, tmp_path, monkeypatch):
    """The pipeline notebook's skip path: both DVC outputs exist and say why, within seconds."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    source = (ROOT / "pipeline" / "anomalib.py").read_text()
    assert 'results_root = "results"' in source
    source = source.replace('results_root = "results"', f"results_root = {str(tmp_path)!r}")
    exec(compile(source, "pipeline/anomalib.py", "exec"), {"__name__": "stage"})
    out = tmp_path / "synthetic" / "anomalib"
    status = json.loads((out / "comparison.json").read_text())["status"]
    assert status.startswith("skipped: anomalib not installed") and peers.INSTALL_HINT in status
    assert pd.read_csv(out / "comparison.csv")["status"].tolist() == [status]


def test_vadlab_weights_load_into_the_timm_network_anomalib_builds():
    """anomalib's extractors are timm features-only networks with batch norms; vadlab's frozen extractor
    folds its batch norms into the convolutions, so copying its state dict failed (keys differ) and the
    comparison could not run. The copied network must give vadlab's features."""
    import timm

    from vadlab.backbones import FeatureExtractor

    layers = ("blocks.1", "blocks.2", "blocks.4")
    names = timm.create_model(peers.TIMM_LITE0, features_only=True, pretrained=False).feature_info.module_name()
    theirs = timm.create_model(peers.TIMM_LITE0, features_only=True, pretrained=False,
                               out_indices=[names.index(layer) for layer in layers]).eval()
    peers._load_lite0(theirs, layers)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = FeatureExtractor("efficientnet_lite0", layers)(x)
        got = theirs(peers._normalise(x))
    for a, b in zip(got, expected):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4
