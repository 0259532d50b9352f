"""The Results chapter's synthesis: its sentences follow the tables they are computed from."""

import pandas as pd
import pytest

from vadlab.methods import available_methods
from vadlab.report import FAMILIES, family_of, pareto_front, synthesis


def test_every_method_has_exactly_one_family():
    members = [m for ms in FAMILIES.values() for m in ms]
    assert sorted(members) == sorted(available_methods())
    assert family_of("dmad") == "deformation"
    with pytest.raises(KeyError, match="no family"):
        family_of("nonexistent")


def test_pareto_front_drops_dominated_runs_only():
    acc = pd.Series({"a": 0.90, "b": 0.95, "c": 0.80, "d": 0.95, "e": None})
    cost = pd.Series({"a": 1.0, "b": 5.0, "c": 2.0, "d": 6.0, "e": 0.1})
    # c is beaten by a (more accurate and cheaper), d by b (as accurate, costlier); e has no accuracy
    assert pareto_front(acc, cost) == ["a", "b"]
    # a tie on both counts dominates neither
    assert pareto_front(pd.Series({"x": 0.9, "y": 0.9}), pd.Series({"x": 1.0, "y": 1.0})) == ["x", "y"]


def tables(padim=0.95, riad=0.70, elpv_riad=0.60):
    summary = pd.DataFrame({
        "image_auroc": {"padim": padim, "riad": riad, "dmad_plus": 0.72, "patchcore": 0.93},
        "aupro": {"padim": 0.80, "riad": 0.60, "dmad_plus": 0.85, "patchcore": 0.82},
        "fit_seconds": {"padim": 3.0, "riad": 40.0, "dmad_plus": 30.0, "patchcore": 2.0},
        "predict_seconds_per_image": {"padim": 0.005, "riad": 0.02, "dmad_plus": 0.003, "patchcore": 0.006},
    })
    impl = {"padim": "padim", "riad": "riad", "dmad_plus": "dmad", "patchcore": "patchcore"}
    elpv = pd.DataFrame({"image_auroc": {"padim": 0.85, "riad": elpv_riad, "dmad_plus": 0.55, "patchcore": 0.80}})
    return summary, impl, elpv


def test_synthesis_reads_its_numbers_from_the_tables():
    summary, impl, elpv = tables()
    text = " ".join(synthesis(summary, impl, elpv))
    assert "density on pretrained features 0.950 (`padim`); memory bank 0.930" in text
    assert "Best AUPRO on the generated data: `dmad_plus` (0.850)" in text
    assert "The same family leads on both datasets (density on pretrained features)" in text
    # inference front: dmad_plus (cheapest), then padim; patchcore is beaten by padim on both counts
    assert "`dmad_plus` (0.720 at 3.0 ms per image), `padim` (0.950 at 5.0 ms per image);" in text
    assert "fit time: `patchcore` (2 s), `padim` (3 s)" in text


def test_synthesis_changes_when_the_tables_change():
    summary, impl, elpv = tables(padim=0.90, riad=0.97, elpv_riad=0.90)
    text = " ".join(synthesis(summary, impl, elpv))
    assert text.startswith("**Generated data, by family** (best run of each family, mean image AUROC over "
                           "categories and seeds): reconstruction 0.970 (`riad`)")
    assert "The leading family changes" not in text  # reconstruction leads on both
    summary, impl, elpv = tables(riad=0.97)
    text = " ".join(synthesis(summary, impl, elpv))
    assert ("The leading family changes: reconstruction on the generated data, density on pretrained "
            "features on ELPV.") in text


def test_unified_sentence():
    summary, impl, _ = tables()
    unified = pd.DataFrame({"protocol": ["unified", "per-category", "unified"], "image_auroc": [0.9, 0.95, 0.6]},
                           index=pd.Index(["padim", "padim", "diad"], name="method"))
    text = synthesis(summary, impl, None, unified)[-1]
    assert text == ("**One model for all categories** (unified protocol, mean image AUROC): `padim` 0.900 "
                    "(per category 0.950); `diad` 0.600.")


def test_schematic_draws_every_box_and_arrow_and_names_bad_input():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    from vadlab.visualize import schematic

    nodes = {"x": (0, 0, "image", "data"), "f": (1, 0, "net", "frozen"), "s": (1, 1, "score", "score")}
    ax = schematic(nodes, [("x", "f"), ("f", "s", "test")], title="M")
    assert sum(isinstance(p, FancyBboxPatch) for p in ax.patches) == 3
    assert len([c for c in ax.get_children() if type(c).__name__ == "Annotation"]) == 2
    assert {t.get_text() for t in ax.texts} >= {"image", "net", "score", "test"}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["data", "frozen (pretrained)",
                                                                    "anomaly score or map"]
    plt.close("all")
    with pytest.raises(ValueError, match=r"unknown kinds \['magic'\]"):
        schematic({"x": (0, 0, "x", "magic")}, [])
    with pytest.raises(ValueError, match=r"undefined nodes \['y'\]"):
        schematic({"x": (0, 0, "x", "data")}, [("x", "y")])


def test_run_folder_is_the_pipelines_layout():
    from pathlib import Path

    from vadlab.report import run_folder

    assert run_folder("synthetic", "padim", "brick", 1) == Path("synthetic", "padim", "brick", "seed1")
    assert run_folder("elpv", "diad", "mono", 3, unified=True) == Path("elpv", "unified", "diad", "mono")
