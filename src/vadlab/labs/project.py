"""The pipeline from a lab: where the project is, its settings (params.yaml), its results table."""

from __future__ import annotations

from pathlib import Path


def project_root(start: str | Path | None = None) -> Path:
    """The repository root: the first folder above ``start`` (default: the working directory) holding
    ``params.yaml`` and ``dvc.yaml``; else the checkout the package was installed from."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    installed = Path(__file__).resolve().parents[3]
    if (installed / "params.yaml").is_file():
        return installed
    raise FileNotFoundError(f"no params.yaml/dvc.yaml above {here}: run the lab inside the vadlab repository")


def show_params(method: str) -> dict | None:
    """Print and return the pipeline settings of ``method`` from params.yaml (None if it has none yet)."""
    import yaml

    params = yaml.safe_load((project_root() / "params.yaml").read_text())
    settings = (params.get("methods") or {}).get(method)
    stages = [key for key in ("run_methods", "unified_methods") if method in (params.get(key) or [])]
    if settings is None:
        print(f"params.yaml has no `methods.{method}` entry yet")
    else:
        print(f"methods.{method} in params.yaml: {settings}")
    print(f"{method} is listed in: {', '.join(stages) if stages else 'no stage (add it to run_methods)'}")
    return settings


def results_table(method: str | None = None):
    """The pipeline's per-category results of ``method`` (all methods if None) as a DataFrame, or None.

    Reads results/tables/per_category.csv; for a method without rows there, the first other table under
    results/tables/ that has rows for it (e.g. the multi-class protocol's).  Prints what to run when nothing
    exists yet.
    """
    import pandas as pd

    root = project_root()
    tables = root / "results" / "tables"
    main = tables / "per_category.csv"
    candidates = [main] + sorted(p for p in tables.glob("*.csv") if p != main)
    for path in candidates:
        if not path.is_file():
            continue
        table = pd.read_csv(path)
        if "method" not in table.columns:
            continue
        if method is not None:
            table = table[table["method"] == method]
        if table.empty:
            continue
        if path != main:
            print(f"rows for {method} from {path.relative_to(root)}")
        cols = [c for c in ("method", "category", "seed", "image_size", "image_auroc", "pixel_auroc", "aupro", "pixel_ap",
                            "fit_seconds") if c in table.columns]
        return table[cols].reset_index(drop=True)
    what = f"rows for {method!r}" if method else "results"
    print(f"no {what} under {tables.relative_to(root)} yet: run `dvc repro` in the repository root (and make sure "
          f"the method is listed in run_methods or unified_methods in params.yaml)")
    return None
