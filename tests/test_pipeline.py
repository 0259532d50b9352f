"""The DVC pipeline's wiring: changing one method's setting re-runs only that method's stages and the report.

DVC decides what to re-run from each stage's declared params and deps, so the test reads the stage graph
(`dvc.repo.Repo(...).index`) rather than running the pipeline: a stage is affected by a params key when it
declares that key (or a parent of it), and so is every stage downstream of it.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import yaml
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def index():
    with Repo(str(ROOT)) as repo:
        yield repo.index


def affected(index, key: str) -> set[str]:
    """Stages DVC re-runs when params key ``key`` (dotted) changes: declarers and everything downstream."""
    graph = index.graph  # edges point from a stage to the stages it depends on
    declares = {stage for stage in index.stages
                for dep in stage.deps if isinstance(dep, ParamsDependency)
                for name in dep.params if key == name or key.startswith(name + ".")}
    downstream = set().union(*(nx.ancestors(graph, stage) for stage in declares)) if declares else set()
    return {stage.addressing for stage in declares | downstream}


def test_one_method_setting_reruns_only_its_stages_and_the_report(index):
    runs, unified = PARAMS["run_methods"], PARAMS["unified_methods"]
    assert "padim" in runs and "padim" in unified and "cflow" in runs and "cflow" not in unified
    report = {"tables", "figures", "elpv_report"}  # elpv_report reads the generated data's summary too
    peers = {s.addressing for s in index.stages if s.addressing.startswith("anomalib")}
    curves = {"curves"}  # the data of `dvc plots`, read from the runs' predictions
    padim = affected(index, "methods.padim.set.ridge")
    assert padim - peers == {"evaluate@padim", "unified@padim", "elpv_evaluate@padim"} | report | curves
    cflow = affected(index, "methods.cflow.image_size")
    assert cflow - peers == {"evaluate@cflow", "elpv_evaluate@cflow"} | report | curves
    # a run of the digits protocol is its own stage too (figures is downstream of tables in the graph;
    # DVC skips it when the table files it reads come out unchanged)
    assert affected(index, "digits.runs.dmad_plus") == {"digits@dmad_plus"} | report


def test_seeds_and_data_rerun_every_evaluation_but_not_the_digits(index):
    evaluations = {f"evaluate@{r}" for r in PARAMS["run_methods"]}
    assert evaluations <= affected(index, "n_seeds")
    assert not any(s.startswith("digits@") for s in affected(index, "n_seeds"))
    assert evaluations | {f"unified@{r}" for r in PARAMS["unified_methods"]} <= affected(index, "data.categories")


def test_elpv_settings_rerun_the_elpv_stages_only(index):
    # `curves` (the data of `dvc plots`) reads both datasets' predictions
    elpv = {"elpv_data", "elpv_report", "curves"} | {f"elpv_evaluate@{r}" for r in PARAMS["run_methods"]}
    assert affected(index, "elpv.max_train") == elpv
    assert affected(index, "elpv.n_seeds") == elpv - {"elpv_data"}
    assert not any(s.startswith("elpv") for s in affected(index, "data.categories") - {"elpv_report"})


def test_execution_settings_rerun_nothing(index):
    # `jobs` changes the wall-clock time only; it must not invalidate results
    assert affected(index, "jobs") == set()
    assert affected(index, "feature_cache") == set()  # an execution setting too


def test_default_pipeline_downloads_nothing(index):
    # the real-dataset download stages exist only when a paper-scale params set lists datasets
    assert not any(s.addressing.startswith("download") for s in index.stages)
