"""Per-category run plus a graded set: does the anomaly score rise with the annotators' defect probability?

ELPV labels each solar cell with an expert defect probability in {0, 1/3, 2/3, 1}. The main protocol
uses p = 0 (train/good, test/good) and p = 1 (test/defective); the uncertain 1/3 and 2/3 cells are scored
by the same fitted model afterwards and summarised by Spearman rank correlations of score versus
probability. Nothing about them (or the test labels) feeds back into fitting or any setting.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from vadlab import fileio
from vadlab.evaluate import (_csv_text, build_method, evaluate, predict_dataset, prepare_out_dir, reset_peak_memory,
                             seed_everything, write_outputs)


def graded_correlation(probabilities: np.ndarray, scores: np.ndarray) -> float:
    """Spearman's rank correlation of ``scores`` with ``probabilities`` (NaN when either is constant)."""
    p, s = np.asarray(probabilities, dtype=float), np.asarray(scores, dtype=float)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(s) == 0:
        return float("nan")
    return float(spearmanr(p, s).statistic)


def run_graded(method: str, data: str | Path, category: str, image_size: int = 256,
               overrides: dict[str, Any] | None = None, out_dir: str | Path | None = None, seed: int = 0,
               batch_size: int = 16) -> dict[str, Any]:
    """:func:`vadlab.evaluate.run` on ``<data>/<category>``, then the graded cells; returns the metrics.

    Adds ``graded_spearman`` (the 1/3 and 2/3 cells only), ``spearman_all`` (every test cell and the graded
    ones: p = 0, 1/3, 2/3, 1) and ``mean_score_p<k>`` (mean score per probability level) to the metrics, and
    writes ``graded.csv`` (file, probability, score) beside ``metrics.json``.
    """
    from vadlab.data import MVTecDataset, make_loader
    from vadlab.data.elpv import ElpvGraded

    if out_dir is not None:
        prepare_out_dir(Path(out_dir), "overwrite")  # stale outputs of an earlier run go
    reset_peak_memory()
    seed_everything(seed)
    train = MVTecDataset(data, category, "train", image_size)
    test = MVTecDataset(data, category, "test", image_size)
    model = build_method(method, overrides, seed)
    model.check_input_size(image_size)
    result = evaluate(model, make_loader(train, batch_size=batch_size, shuffle=True, seed=seed), test, batch_size)
    graded = ElpvGraded(data, category, image_size)
    scored = predict_dataset(model, graded, batch_size, desc="graded")
    probs = np.asarray([p for _, p in graded.cells])
    all_probs = np.concatenate([result.labels.astype(float), probs])
    all_scores = np.concatenate([result.scores, scored["scores"]])
    levels = {f"mean_score_p{round(3 * p)}": float(all_scores[np.isclose(all_probs, p)].mean())
              for p in np.unique(all_probs)}
    result.metrics.update(method=method, category=category, protocol="per-category", seed=seed,
                          image_size=image_size, data=str(data), config=asdict(model.config), n_train=len(train),
                          n_graded=len(graded), graded_spearman=graded_correlation(probs, scored["scores"]),
                          spearman_all=graded_correlation(all_probs, all_scores), **levels)
    if out_dir is not None:  # graded.csv first: metrics.json, written last, marks the run complete
        out_dir = Path(out_dir)
        fileio.write_text(out_dir / "graded.csv", _csv_text(
            ["file", "probability", "score"],
            ([Path(f).name, f"{p:.6f}", f"{s:.8g}"] for f, p, s in zip(scored["paths"], probs, scored["scores"]))))
        write_outputs(result, out_dir, model=model)
    return result.metrics
