"""The distillation lab: MKD's multiresolution distillation loss (``check_mkd_loss``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from ._common import _Case, _Mistake, _call, _gen, _run_check


def _ref_mkd_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], lamda: float) -> torch.Tensor:
    """Per-image loss ``[B]`` computed by the package's own ``MKD.loss_per_image`` / ``MKD.layer_losses``, run on a
    stand-in model whose student and teacher return the given feature maps."""
    from vadlab.methods.mkd import MKD

    stand_in = SimpleNamespace(teacher=lambda x: list(teacher_feats), student=lambda x: list(student_feats),
                               backbone=SimpleNamespace(normalize=lambda x: x), config=SimpleNamespace(lamda=lamda))
    stand_in.layer_losses = lambda x, targets=None: MKD.layer_losses(stand_in, x, targets)
    return MKD.loss_per_image(stand_in, None)


def _run_mkd_loss(fn, student_feats, teacher_feats, lamda):
    return {"loss": _call(fn, list(student_feats), list(teacher_feats), lamda)}


def _loss_parts(student_feats, teacher_feats):
    values = [(c - t).pow(2).flatten(1).mean(1) for c, t in zip(student_feats, teacher_feats)]
    directions = [1 - F.cosine_similarity(c.flatten(1), t.flatten(1), dim=1) for c, t in zip(student_feats, teacher_feats)]
    return values, directions


def _loss_per_position_cosine(s, t, lamda):
    values, _ = _loss_parts(s, t)
    directions = [(1 - F.cosine_similarity(c, u, dim=1)).flatten(1).mean(1) for c, u in zip(s, t)]
    return sum(directions) + lamda * sum(values)


def _loss_lambda_on_direction(s, t, lamda):
    values, directions = _loss_parts(s, t)
    return lamda * sum(directions) + sum(values)


def _loss_sum_not_mean(s, t, lamda):
    values = [(c - u).pow(2).flatten(1).sum(1) for c, u in zip(s, t)]
    return sum(_loss_parts(s, t)[1]) + lamda * sum(values)


def _loss_cosine_not_one_minus(s, t, lamda):
    values, directions = _loss_parts(s, t)
    return sum(1 - d for d in directions) + lamda * sum(values)


def _loss_last_layer_only(s, t, lamda):
    values, directions = _loss_parts(s[-1:], t[-1:])
    return sum(directions) + lamda * sum(values)


def _loss_mean_over_layers(s, t, lamda):
    values, directions = _loss_parts(s, t)
    return (sum(directions) + lamda * sum(values)) / len(s)


def _feats(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=_gen(seed + i), dtype=torch.float64) for i, shape in enumerate(shapes)]


def check_mkd_loss(mkd_loss: Callable[[list[torch.Tensor], list[torch.Tensor], float], torch.Tensor],
                   raise_on_fail: bool | None = None) -> bool:
    """Check ``mkd_loss(student_feats, teacher_feats, lamda) -> [B]``: per image, the sum over layers of the
    direction loss ``1 - cos(vec C_l, vec T_l)`` plus ``lamda`` times the sum of the value losses ``mean((C_l - T_l)^2)``."""
    f64 = torch.float64
    shapes = [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    teacher = _feats(shapes, 30)
    student = _feats(shapes, 40)
    near = [t + 0.3 * s for t, s in zip(teacher, student)]
    scaled = [2.0 * t for t in teacher]
    flipped = [-t for t in teacher]
    ms = [t.pow(2).flatten(1).mean(1) for t in teacher]
    one = _feats([(1, 3, 5, 7)], 50)
    one_student = _feats([(1, 3, 5, 7)], 51)
    pos_t = [torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=f64)]  # [1, 2, 1, 2]: two positions, two channels
    pos_s = [torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]]]], dtype=f64)]
    cases = [
        _Case("the student equals the teacher: loss 0", {"student_feats": [t.clone() for t in teacher],
                                                         "teacher_feats": teacher, "lamda": 0.5},
              {"loss": torch.zeros(2, dtype=f64)}),
        _Case("student = 2 x teacher: direction 0 (scale-blind), value (2 - 1)^2 mean(T^2)",
              {"student_feats": scaled, "teacher_feats": teacher, "lamda": 0.5}, {"loss": 0.5 * sum(ms)}),
        _Case("student = -teacher, lamda 0: direction loss 2 per layer",
              {"student_feats": flipped, "teacher_feats": teacher, "lamda": 0.0},
              {"loss": torch.full((2,), 8.0, dtype=f64)}),
        _Case("one layer, two positions: whole-map cosine 1 - (1 + 3) / (sqrt 2 sqrt 10), lamda 1",
              {"student_feats": pos_s, "teacher_feats": pos_t, "lamda": 1.0},
              {"loss": torch.tensor([1 - 4 / (2 ** 0.5 * 10 ** 0.5) + 1.0], dtype=f64)}),
        _Case("one image, one layer [1, 3, 5, 7], lamda 0.01",
              {"student_feats": one_student, "teacher_feats": one, "lamda": 0.01}),
        _Case("four layers (strides 4..32 of a 64 px image), a student near the teacher, lamda 0.5",
              {"student_feats": near, "teacher_feats": teacher, "lamda": 0.5}),
        _Case("four layers, an unrelated student, lamda 2", {"student_feats": student, "teacher_feats": teacher,
                                                             "lamda": 2.0}),
    ]
    mistakes = [
        _Mistake(_loss_per_position_cosine, "the direction loss compares the whole flattened maps vec(C_l) and vec(T_l) "
                                            "(one cosine per image and layer), not the channel vectors position by position"),
        _Mistake(_loss_lambda_on_direction, "lamda weighs the value (MSE) loss: L = sum_l L_dir + lamda * sum_l L_val"),
        _Mistake(_loss_sum_not_mean, "the value loss is the *mean* of the squared differences over channels and "
                                     "positions, not their sum"),
        _Mistake(_loss_cosine_not_one_minus, "the direction loss is 1 - cos: 0 when the maps point the same way"),
        _Mistake(_loss_last_layer_only, "sum the losses over *all* the layers in the lists (multiresolution), not only "
                                        "the last one"),
        _Mistake(_loss_mean_over_layers, "the losses are summed over the layers, not averaged"),
    ]
    hints = ["for each layer: C.flatten(1) and T.flatten(1) are [B, N_l]; cosine along dim=1 "
             "(torch.nn.functional.cosine_similarity) and the mean of (C - T)^2 along dim=1",
             "return one number per image, shape [B]: do not average over the batch"]
    return _run_check("check_mkd_loss", "mkd_loss", _run_mkd_loss, (mkd_loss,), (_ref_mkd_loss,), cases,
                      {"loss": (1e-6, 1e-8)}, mistakes, hints, raise_on_fail)
