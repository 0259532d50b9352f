"""Automatic checks for the course labs (``book/labs/``), and the student-edition generator.

Every lab asks the student to implement one core piece of a method in a marked exercise cell, then calls
``check_<exercise>(student_fn)``.  A check runs the function on cases with known answers (edge cases
included) and on random cases whose expected output comes from the package's own implementation, and
prints one line per case: ``PASS``, or ``FAIL`` with the input shapes, the first mismatching index and
values, and a hint.  When the wrong output matches a typical mistake (a missing square root, a
stop-gradient on the wrong side, ...) the hint names that mistake.  A check never prints solution code.

Return value and strictness: a check returns ``True`` / ``False``.  With ``raise_on_fail=True``, or when
the environment variable ``VADLAB_LABS_STRICT=1`` is set (the instructor build sets it, so a broken
solution fails the build), a failing check raises ``AssertionError`` with the same report.  A function
that still raises ``NotImplementedError`` (the student edition's placeholder) is reported as "not
implemented yet", not as a crash, so the student book executes from top to bottom.

The inputs of the last failing case are kept in :data:`last_failure` (``.case``, ``.inputs``) so that a
student can call the function on them and debug.

Student edition: :func:`student_version` turns a lab's jupytext source into the student's: in cells
tagged ``solution`` the lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` become a
``raise NotImplementedError`` placeholder (same indentation); a solution cell without markers is emptied
entirely.  Everything else is kept byte for byte.  ``python -m vadlab.labs student|instructor SRC DST``
writes a copy of a lab folder as one edition (used by ``scripts/build_labs.sh``).

Layout: one module per lab, named after it (``metrics``, ``padim``, ``patchcore``, ``semi_orthogonal``,
``flows``, ``reconstruction``, ``distillation``, ``dmad``, ``diad``), the shared reporting machinery in
``_common``, the pipeline helpers in ``project`` and the student edition in ``editions``.  Everything public is re-exported here, so a lab
imports ``from vadlab.labs import check_...``.
"""

from __future__ import annotations

from typing import Callable

from ._common import Failure, last_failure
from .diad import _ref_ddim_step, _ref_guided_eps, check_ddim_step, check_guided_eps
from .distillation import _ref_mkd_loss, check_mkd_loss
from .dmad import _ref_dmad_score, _ref_quantize, check_dmad_score, check_quantize
from .editions import EDITIONS, PLACEHOLDER, student_version, write_lab_edition, write_student_labs
from .flows import (_ref_coupling_forward, _ref_coupling_inverse, _ref_positional_encoding, check_affine_coupling,
                    check_positional_encoding)
from .metrics import _ref_aupro, _ref_auroc, check_aupro, check_auroc
from .padim import _ref_mahalanobis_map, check_mahalanobis_map
from .patchcore import _ref_greedy_coreset, check_greedy_coreset
from .project import project_root, results_table, show_params
from .reconstruction import _ref_ssim_map, check_ssim_map, ssim_blur
from .semi_orthogonal import _ref_projected_mahalanobis, _ref_semi_orthogonal_matrix, check_semi_orthogonal

__all__ = [
    "check_auroc",
    "check_aupro",
    "check_mahalanobis_map",
    "check_greedy_coreset",
    "check_affine_coupling",
    "check_positional_encoding",
    "check_ssim_map",
    "check_quantize",
    "check_dmad_score",
    "check_ddim_step",
    "check_guided_eps",
    "check_semi_orthogonal",
    "check_mkd_loss",
    "ssim_blur",
    "reference",
    "last_failure",
    "project_root",
    "show_params",
    "results_table",
    "student_version",
    "write_lab_edition",
    "write_student_labs",
]


_REFERENCES: dict[str, Callable | tuple[Callable, ...]] = {
    "auroc": _ref_auroc,
    "aupro": _ref_aupro,
    "mahalanobis_map": _ref_mahalanobis_map,
    "greedy_coreset": _ref_greedy_coreset,
    "affine_coupling": (_ref_coupling_forward, _ref_coupling_inverse),
    "positional_encoding": _ref_positional_encoding,
    "ssim_map": _ref_ssim_map,
    "quantize": _ref_quantize,
    "dmad_score": _ref_dmad_score,
    "ddim_step": _ref_ddim_step,
    "guided_eps": _ref_guided_eps,
    "semi_orthogonal": (_ref_semi_orthogonal_matrix, _ref_projected_mahalanobis),
    "mkd_loss": _ref_mkd_loss,
}


def reference(exercise: str) -> Callable | tuple[Callable, ...]:
    """The package's implementation in the signature of an exercise (a tuple for ``affine_coupling`` and
    ``semi_orthogonal``)."""
    if exercise not in _REFERENCES:
        raise KeyError(f"unknown exercise {exercise!r}; choose one of {sorted(_REFERENCES)}")
    return _REFERENCES[exercise]
