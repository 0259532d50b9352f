"""One-class digits protocol (the MNIST protocol of DMAD and many reconstruction papers), for any method.

For each normal digit ``d``: fit the method on the training images of ``d`` only, score every test
digit, and report the image AUROC of "not d" against "d".  The offline default uses scikit-learn's
8x8 digits (:class:`vadlab.data.DigitsOneClass`, upsampled to ``image_size``); pass
``mnist_root`` to use MNIST idx files instead (:class:`vadlab.data.MNISTOneClass`).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from vadlab.methods import get_method


def _scores(model, dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    scores, labels = [], []
    with torch.no_grad():
        for batch in loader:
            s, _ = model.predict(batch["image"])
            scores.append(s.detach().cpu().numpy())
            labels.append(np.asarray(batch["label"]))
    return np.concatenate(scores), np.concatenate(labels)


def run_digits(method_name: str, digits: Iterable[int] = range(10), image_size: int = 32,
               overrides: dict[str, Any] | None = None, seed: int = 0, batch_size: int = 16,
               mnist_root: str | None = None) -> dict[int | str, float]:
    """Image AUROC per normal digit, plus ``"mean"`` over the digits run.

    ``overrides`` are passed to the method's config (e.g. a preset such as
    ``vadlab.methods.dmad.DIGITS_PRESET``).  ``seed`` fixes the train/test split of the
    scikit-learn digits, the shuffling of the training loader and torch's global RNG.
    """
    from sklearn.metrics import roc_auc_score

    from vadlab.data import DigitsOneClass, MNISTOneClass

    klass = get_method(method_name)
    digits = [int(d) for d in digits]
    if not digits or any(d not in range(10) for d in digits):
        raise ValueError(f"digits must be a non-empty selection of 0..9, got {digits}")
    results: dict[int | str, float] = {}
    for digit in tqdm(digits, desc=f"{method_name} digits", leave=False):
        if mnist_root is None:
            train = DigitsOneClass(digit, "train", image_size, seed=seed)
            test = DigitsOneClass(digit, "test", image_size, seed=seed)
        else:
            train = MNISTOneClass(mnist_root, digit, "train", image_size)
            test = MNISTOneClass(mnist_root, digit, "test", image_size)
        torch.manual_seed(seed)
        np.random.seed(seed)
        generator = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
        model = klass(**(overrides or {}))
        model.fit(loader)
        scores, labels = _scores(model, test, batch_size)
        results[digit] = float(roc_auc_score(labels, scores))
    results["mean"] = float(np.mean([results[d] for d in digits]))
    return results


__all__ = ["run_digits"]
