"""What every lab check shares: the test cases, the comparison of outputs, the report and
:data:`last_failure`.  The checks themselves live in one module per lab (``metrics``, ``padim``, ...)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class Failure:
    """The case a check failed on last: its name and the inputs (copies) to debug with."""

    check: str = ""
    case: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)


#: inputs of the last failing case of any check (empty until a check fails)
last_failure = Failure()


def _record_failure(check: str, case: str, inputs: dict[str, Any]) -> None:
    # updated in place, so that `vadlab.labs.last_failure` (the same object) always shows the latest failure
    last_failure.check, last_failure.case, last_failure.inputs = check, case, inputs


class _NotImplemented(Exception):
    """The student's function still raises NotImplementedError."""


@dataclass
class _Case:
    """One test input.  ``expected`` (known answers) is optional: missing outputs come from the reference."""

    name: str
    inputs: dict[str, Any]
    expected: dict[str, Any] | None = None


@dataclass
class _Mistake:
    """A typical wrong implementation (same signature as the student's) and the hint shown when matched."""

    fn: Callable[..., Any]
    hint: str


def _strict(raise_on_fail: bool | None) -> bool:
    if raise_on_fail is not None:
        return bool(raise_on_fail)
    return os.environ.get("VADLAB_LABS_STRICT", "0") not in ("", "0", "false", "False")


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clone(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # e.g. DiAD's Guidance: its tensors and lists
        return dataclasses.replace(v, **{f.name: _clone(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init})
    return v


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor {list(v.shape)} {str(v.dtype).replace('torch.', '')}"
    if isinstance(v, np.ndarray):
        return f"array {list(v.shape)} {v.dtype}"
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (torch.Tensor, np.ndarray)) for x in v):
        return f"{type(v).__name__} of {len(v)}: " + ", ".join(_describe(x) for x in v)
    if isinstance(v, torch.nn.Module):
        return type(v).__name__
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # its fields, each described (not its repr)
        return f"{type(v).__name__}(" + ", ".join(f"{f.name}={_describe(getattr(v, f.name))}"
                                                   for f in dataclasses.fields(v)) + ")"
    if callable(v):
        return "function"
    return repr(v)


def _as_array(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _compare(name: str, got: Any, expected: Any, rtol: float, atol: float, exact: bool = False) -> str | None:
    """None if ``got`` matches ``expected``; otherwise a short description of the first difference."""
    if got is None:
        return f"`{name}` is None (did you forget a `return`?)"
    try:
        g = _as_array(got)
    except Exception:  # noqa: BLE001 - anything that is not array-like
        return f"`{name}` has type {type(got).__name__}; expected {_describe(expected)}"
    e = _as_array(expected)
    if g.dtype == object:
        return f"`{name}` could not be read as numbers (got {type(got).__name__})"
    if g.shape != e.shape:
        if g.size == e.size and g.size > 1:
            extra = " (same number of entries: a reshape/permute mix-up, or a missing or extra dimension?)"
        else:
            extra = ""
        return f"`{name}` has shape {list(g.shape)}, expected {list(e.shape)}{extra}"
    if e.size == 0:
        return None
    if exact:
        ok = g == e
    else:
        g64, e64 = g.astype(np.float64), e.astype(np.float64)
        if not np.isfinite(g64).all():
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(g64))[0])
            where = f" at index {idx}" if g.ndim else ""
            return f"`{name}` contains NaN or inf{where} (a square root or log of a negative number, or 0/0?)"
        ok = np.isclose(g64, e64, rtol=rtol, atol=atol)
    if ok.all():
        return None
    if g.ndim == 0:
        return f"`{name}` = {_fmt(g)}, expected {_fmt(e)}"
    bad = np.argwhere(~ok)
    idx = tuple(int(i) for i in bad[0])
    msg = (f"`{name}` differs at index {idx}: got {_fmt(g[idx])}, expected {_fmt(e[idx])} "
           f"({len(bad)} of {e.size} entries differ")
    if not exact:
        msg += f", max |difference| {np.max(np.abs(g.astype(np.float64) - e.astype(np.float64))):.3g}"
    return msg + ")"


def _fmt(v: Any) -> str:
    v = np.asarray(v)
    if v.dtype.kind in "fc":
        return f"{float(v):.6g}"
    return str(v.item() if v.ndim == 0 else v)


def _run_check(label: str, fn_names: str, run: Callable[..., dict[str, Any]], fns: tuple[Callable, ...],
               ref: tuple[Callable, ...], cases: list[_Case], tolerances: dict[str, tuple[float, float]],
               mistakes: list[_Mistake], hints: list[str], raise_on_fail: bool | None,
               exact: tuple[str, ...] = ()) -> bool:
    """Run every case on the student's functions and print the report (see the package docstring)."""
    lines: list[str] = []
    n_pass = 0
    first_fail: _Case | None = None
    not_implemented = False
    for case in cases:
        expected = dict(case.expected or {})
        ref_out = run(*ref, **_clone(case.inputs))
        for k, v in ref_out.items():
            expected.setdefault(k, v)
        try:
            got = run(*fns, **_clone(case.inputs))
        except _NotImplemented:
            not_implemented = True
            break
        except Exception as exc:  # noqa: BLE001 - report any error of the student's code
            lines.append(f"  FAIL  {case.name}\n        inputs: {_inputs_line(case)}\n"
                         f"        your code raised {type(exc).__name__}: {exc}")
            first_fail = first_fail or case
            continue
        problems = [p for k in expected if (p := _compare(k, got.get(k), expected[k], *tolerances.get(k, (1e-5, 1e-7)),
                                                          exact=k in exact))]
        if not problems:
            n_pass += 1
            lines.append(f"  PASS  {case.name}")
            continue
        first_fail = first_fail or case
        text = f"  FAIL  {case.name}\n        inputs: {_inputs_line(case)}"
        text += "".join(f"\n        {p}" for p in problems[:3])
        hint = _match_mistake(run, mistakes, case, got, expected, tolerances, exact)
        if hint:
            text += f"\n        hint: {hint}"
        lines.append(text)
    if not_implemented:
        report = (f"{label}: not implemented yet - `{fn_names}` still raises NotImplementedError.\n"
                  f"  Write your code in the exercise cell (replace the `raise NotImplementedError` line), run that cell, "
                  f"then run this check again.")
        _record_failure(label, "not implemented", {})
        ok = False
    else:
        ok = n_pass == len(cases)
        head = (f"{label}: all {len(cases)} cases pass. Well done!" if ok
                else f"{label}: {n_pass} of {len(cases)} cases pass")
        report = "\n".join([head, *lines])
        if not ok:
            assert first_fail is not None
            _record_failure(label, first_fail.name, _clone(first_fail.inputs))
            if hints:
                report += "\n  Things to check:\n" + "\n".join(f"   - {h}" for h in hints)
            report += ("\n  The inputs of the first failing case are in `vadlab.labs.last_failure.inputs`: "
                       "call your function on them to debug.")
    print(report, flush=True)
    if not ok and _strict(raise_on_fail):
        raise AssertionError(report)
    return ok


def _inputs_line(case: _Case) -> str:
    return ", ".join(f"{k}={_describe(v)}" for k, v in case.inputs.items())


def _match_mistake(run, mistakes: list[_Mistake], case: _Case, got: dict, expected: dict,
                   tolerances: dict, exact: tuple[str, ...]) -> str | None:
    """The hint of the first typical mistake whose output equals the student's on this case."""
    for m in mistakes:
        try:
            out = run(*(m.fn if isinstance(m.fn, tuple) else (m.fn,)), **_clone(case.inputs))
        except Exception:  # noqa: BLE001 - a mistake may crash on this input
            continue
        same_as_mistake = all(_compare(k, got.get(k), out[k], *tolerances.get(k, (1e-5, 1e-7)), exact=k in exact) is None
                              for k in expected if k in out)
        differs_from_right = any(_compare(k, out[k], expected[k], *tolerances.get(k, (1e-5, 1e-7)), exact=k in exact)
                                 for k in expected if k in out)
        if same_as_mistake and differs_from_right:
            return m.hint
    return None


def _call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a student's function; turn its NotImplementedError into the 'not implemented yet' report."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        raise _NotImplemented from exc


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
