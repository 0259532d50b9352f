"""The ``vadlab`` command: one verb per job.

    vadlab data synth --out DIR [--seed N]          write the generated dataset (MVTec layout)
    vadlab data download mvtec|btad|visa --out DIR  fetch, verify and convert a real dataset to MVTec layout
    vadlab data elpv --out DIR [--seed N]           write the ELPV solar cells (pip install elpv-dataset)
    vadlab evaluate METHOD --data ROOT --category C fit on train/good, score test/, write metrics.json
    vadlab fit METHOD --data ROOT --category C --out model.pt
    vadlab test MODEL.pt --data ROOT --category C   score a saved model on test/, all metrics, no refit
    vadlab predict MODEL.pt IMAGE_OR_DIR ... --out DIR
    vadlab methods                                  list methods and their hyperparameters

User errors (a bad value, a missing file) end with one line on stderr and exit code 2; Ctrl-C exits 130.
Messages go through the ``vadlab`` logger: notes and results to stdout, warnings to stderr (``-v`` for
more, ``-q`` for warnings only); tables of metrics are printed to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MIN_IMAGE_SIZE = 32
MAX_SEED = 2**32 - 1
log = logging.getLogger("vadlab")


def _parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _resolve_run(args: argparse.Namespace) -> None:
    """Fill ``args.method``, ``args.overrides`` and ``args.image_size`` from the method, ``--config --run``,
    ``--preset``, ``--set`` and ``--device`` (in that order, later ones win)."""
    from vadlab.methods import preset_overrides, run_settings

    overrides: dict = {}
    size = None
    if args.config or args.run:
        if not (args.config and args.run):
            raise ValueError("--config FILE and --run NAME go together (a run's block under `methods:` of FILE)")
        if args.preset is not None:
            raise ValueError("--preset and --config both set the preset; put `preset:` in the run's block instead")
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path} does not exist; pass a params.yaml")
        params = yaml.safe_load(path.read_text()) or {}
        if not isinstance(params, dict) or not isinstance(params.get("methods"), dict):
            raise ValueError(f"--config {path} has no `methods:` block of runs")
        try:
            method, overrides, size = run_settings(args.run, params["methods"])
        except KeyError as err:
            raise ValueError(f"--run {args.run}: {err.args[0]}") from None
        if args.method and args.method != method:
            raise ValueError(f"method {args.method!r} differs from run {args.run!r}'s method {method!r}; "
                             "leave the method out with --config")
        args.method = method
    elif not args.method:
        raise ValueError("name a method (see `vadlab methods`) or pass --config params.yaml --run NAME")
    else:
        overrides = preset_overrides(args.method, args.preset or "paper")
    overrides = {**overrides, **_parse_sets(args.set)}
    if args.device:
        overrides["device"] = args.device
    args.overrides = overrides
    args.image_size = _check_image_size(args.image_size if args.image_size is not None else (size or 256),
                                         args.batch_size)


def _check_image_size(size: int, batch_size: int, n_images: int = 0) -> int:
    """``size`` when it is at least MIN_IMAGE_SIZE and a rough memory estimate fits this machine's memory."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"--image-size {size} is too small: the backbones reduce images 16-32 times, use at "
                         f"least {MIN_IMAGE_SIZE}")
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return size
    # a lower bound: one batch through a backbone (~64 float feature channels per pixel at full
    # resolution, summed over layers) plus the test maps kept for the metrics (float32, ~3 copies)
    need = batch_size * size * size * 4 * 64 + n_images * size * size * 4 * 3
    if need > total:
        raise ValueError(f"--image-size {size} with --batch-size {batch_size} needs at least "
                         f"{need / 2**30:.0f} GiB of memory (estimate), this machine has {total / 2**30:.0f} GiB; "
                         "lower --image-size or --batch-size")
    return size


def _table(rows: list[dict], keys: Sequence[str]) -> str:
    """A plain-text table of ``rows`` with columns ``keys`` (floats with 3 decimals)."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))  # None: no pixel masks
    cells = [[k for k in keys]] + [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(keys))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from vadlab.data import generate

    kwargs = {"seed": args.seed, "size": args.size, "n_train": args.n_train, "n_test": args.n_test,
              "overwrite": args.overwrite}
    if args.categories:
        kwargs["categories"] = list(dict.fromkeys(args.categories))
    out = generate(args.out, **kwargs)
    log.info("wrote the generated dataset to %s", out)
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from vadlab.data.download import download

    out = download(args.name, args.out, url=args.url or None, sha256=args.sha256, archive=args.archive,
                   cache=args.cache, categories=tuple(dict.fromkeys(args.categories)) if args.categories else None)
    log.info("wrote %s in MVTec layout to %s", args.name, out)
    return 0


def cmd_data_elpv(args: argparse.Namespace) -> int:
    from vadlab.data.elpv import CITATION, write_elpv

    out = write_elpv(args.out, seed=args.seed, train_fraction=args.train_fraction, max_train=args.max_train,
                     limit=args.limit, overwrite=args.overwrite)
    log.info("wrote ELPV (mono, poly) in MVTec layout to %s\n%s", out, CITATION)
    return 0


def _categories(args: argparse.Namespace) -> list[str]:
    """The --category values without repeats (a repeat would count twice in the mean), or every category."""
    from vadlab.data import list_categories

    if args.category:
        unique = list(dict.fromkeys(args.category))
        if len(unique) < len(args.category):
            log.warning("--category repeats a name; each category is evaluated once: %s", ", ".join(unique))
        return unique
    found = list_categories(args.data)
    if not found:
        raise FileNotFoundError(f"dataset root {args.data} holds no categories (folders with train/ or test/); "
                                f"create one with `vadlab data synth --out {args.data}` or point --data elsewhere")
    return found


def _mean_row(rows: list[dict], keys: Sequence[str]) -> dict:
    mean = {}
    for k in keys:
        values = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        mean[k] = sum(values) / len(values) if len(values) == len(rows) else None
    return {"category": "mean", **mean}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vadlab import fileio
    from vadlab.evaluate import METRIC_KEYS, finished_run_error, run, run_unified

    _resolve_run(args)
    categories = _categories(args)
    if args.out is not None:
        fileio.check_writable(args.out)
        folders = [Path(args.out) / c for c in categories] if len(categories) > 1 or args.protocol == "unified" \
            else [Path(args.out)]
        finished = [f for f in folders if (f / "metrics.json").is_file()]
        if finished and args.existing == "refuse":  # say so before the first category is fitted
            raise finished_run_error(finished[0])
    keys = ("category",) + METRIC_KEYS + ("fit_seconds", "predict_seconds_per_image")
    if args.protocol == "unified":
        results = run_unified(args.method, args.data, categories, args.image_size, args.overrides, args.out,
                              args.seed, args.batch_size, existing=args.existing)
        rows = list(results.values())
    else:
        rows = []
        for category in categories:
            out = None if args.out is None else (Path(args.out) / category if len(categories) > 1 else Path(args.out))
            rows.append(run(args.method, args.data, category, args.image_size, args.overrides, out, args.seed,
                            args.batch_size, save_model=args.save_model, existing=args.existing))
    if len(rows) > 1:
        rows.append(_mean_row(rows, keys[1:]))
    print(f"{args.method} ({args.protocol}, {args.image_size} px, seed {args.seed})")
    print(_table(rows, keys))
    for reason in sorted({r["pixel_metrics_missing"] for r in rows if r.get("pixel_metrics_missing")}):
        print(f"pixel metrics —: {reason}")
    if args.out is not None:
        log.info("wrote metrics.json, predictions, curves and overlays to %s", args.out)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torch.utils.data import Subset

    from vadlab import fileio
    from vadlab.data import MVTecDataset, make_loader
    from vadlab.evaluate import build_method, predict_dataset, seed_everything

    _resolve_run(args)
    out = fileio.check_writable(args.out, is_dir=False)
    if not 0 <= args.holdout < 1 or not 0 < args.quantile <= 1:
        raise ValueError(f"need 0 <= --holdout < 1 and 0 < --quantile <= 1, got {args.holdout} and {args.quantile}")
    seed_everything(args.seed)
    train = MVTecDataset(args.data, args.category, "train", args.image_size)
    n_hold = int(round(len(train) * args.holdout))
    if n_hold and len(train) - n_hold < 2:
        raise ValueError(f"--holdout {args.holdout} leaves fewer than 2 training images of {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    fit_set, hold_set = Subset(train, order[n_hold:]), Subset(train, order[:n_hold])
    model = build_method(args.method, args.overrides, args.seed)
    model.check_input_size(args.image_size)
    model.fit(make_loader(fit_set, batch_size=args.batch_size, shuffle=True, seed=args.seed))
    info = {"method": args.method, "image_size": args.image_size, "category": args.category, "data": str(args.data),
            "seed": args.seed, "overrides": {k: str(v) for k, v in args.overrides.items()},
            "run": args.run, "config": dataclasses.asdict(model.config)}
    if n_hold:
        held = predict_dataset(model, hold_set, args.batch_size, desc="held-out normals")["scores"]
        info.update(threshold=float(np.quantile(held, args.quantile)), threshold_quantile=args.quantile,
                    n_holdout=n_hold)
    # the .pt holds everything prediction needs (one file: a kill never pairs a model with another's
    # threshold); the .json is a readable copy, removed first and written after the model
    summary = out.with_suffix(".json")
    summary.unlink(missing_ok=True)
    model.save(out, info)
    fileio.write_json(summary, model.meta)
    log.info("saved %s to %s (+ %s)", args.method, out, summary.name)
    return 0


def _image_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(inputs)}")
    return files


def _load_model(args: argparse.Namespace):
    """The saved model, its metadata (old files: from the .json beside it) and the image size to use."""
    from vadlab.evaluate import resolve_device
    from vadlab.methods import AnomalyMethod

    model = AnomalyMethod.load(args.model, device=resolve_device(args.device) if args.device else None)
    meta = dict(model.meta)
    if not meta:
        info_path = Path(args.model).with_suffix(".json")
        if info_path.is_file():
            log.info("using %s beside the model (an older model file without metadata)", info_path)
            meta = json.loads(info_path.read_text())
    trained = meta.get("image_size")
    if args.image_size is not None and trained and args.image_size != trained:
        log.warning("--image-size %d differs from the %d px the model was fitted at: scores and the threshold "
                    "are not comparable to the fit's", args.image_size, trained)
    size = args.image_size if args.image_size is not None else trained
    if size is None:
        size = 256
        log.warning("%s does not record its image size: using %d px (pass --image-size)", args.model, size)
    return model, meta, _check_image_size(int(size), args.batch_size)


PREDICT_OUTPUTS = ("scores.csv", "maps", "heatmaps")


@contextlib.contextmanager
def _size_hint(meta: dict, size: int):
    """Add the fitted image size to a shape error raised while predicting at another size."""
    try:
        yield
    except ValueError as err:
        trained = meta.get("image_size")
        if trained and trained != size:
            raise ValueError(f"{err} (the model was fitted at {trained} px and cannot predict at {size}: "
                             f"drop --image-size or pass {trained})") from None
        raise


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vadlab import fileio
    from vadlab.data.mvtec import load_image
    from vadlab.visualize import save_heatmap

    out = fileio.check_writable(args.out)
    files = _image_files(args.images)
    model, meta, size = _load_model(args)
    threshold = meta.get("threshold")
    fileio.remove_stale(out, PREDICT_OUTPUTS)  # scores.csv first: it is written last, the "complete" mark
    rows, lo, hi = [], float("inf"), float("-inf")
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        images = torch.stack([load_image(f, size) for f in chunk])
        with _size_hint(meta, size):
            scores, maps = model.predict(images)
        for i, (f, s, m) in enumerate(zip(chunk, scores.tolist(), maps.cpu().float().numpy()), start):
            map_file = out / "maps" / f"{i:05d}_{f.stem}.npy"  # numbered: folders may repeat file names
            with fileio.atomic_path(map_file) as tmp, open(tmp, "wb") as fh:
                np.save(fh, m.astype(np.float32))
            lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
            rows.append({"image": str(f), "map": str(map_file.relative_to(out)), "score": s,
                         "anomalous": "" if threshold is None else int(s > threshold)})
    if args.heatmaps:  # second pass: one colour scale for every image of the call
        for row in rows:
            image = load_image(row["image"], size).permute(1, 2, 0).numpy()
            name = Path(row["map"]).with_suffix(".png").name
            save_heatmap(out / "heatmaps" / name, image, np.load(out / row["map"]), row["score"], lo, hi,
                         threshold, title=Path(row["image"]).name)
    fileio.write_text(out / "scores.csv", _csv(rows, ["image", "map", "score", "anomalous"]))
    log.info("scored %d images -> %s%s", len(rows), out / "scores.csv",
             "" if threshold is None else f" (threshold {threshold:.4g} from held-out normal images)")
    return 0


def _csv(rows: list[dict], fields: list[str]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def cmd_test(args: argparse.Namespace) -> int:
    from vadlab import fileio
    from vadlab.data import MVTecDataset
    from vadlab.evaluate import METRIC_KEYS, prepare_out_dir, reset_peak_memory, score, write_outputs

    if args.out is not None:
        fileio.check_writable(args.out)
    model, meta, size = _load_model(args)
    category = args.category or meta.get("category")
    if not category:
        raise ValueError(f"{args.model} does not record its category: pass --category")
    if meta.get("category") and category != meta["category"]:
        log.warning("scoring a model fitted on %r on category %r", meta["category"], category)
    test = MVTecDataset(args.data, category, "test", size)
    if args.out is not None:
        reused = prepare_out_dir(Path(args.out), args.existing)
        if reused is not None:
            print(_table([reused], ("category",) + METRIC_KEYS))
            return 0
    reset_peak_memory()
    with _size_hint(meta, size):
        result = score(model, test, args.batch_size)
    result.metrics.update(method=model.name, category=category, protocol="test", image_size=size,
                          data=str(args.data), model=str(args.model), config=dataclasses.asdict(model.config),
                          threshold=meta.get("threshold"))
    if args.out is not None:
        write_outputs(result, Path(args.out))
        log.info("wrote metrics.json, predictions, curves and overlays to %s", args.out)
    print(f"{model.name} on {category} ({size} px), model {args.model}")
    print(_table([result.metrics], ("category",) + METRIC_KEYS))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from vadlab.methods import available_methods, get_method

    for name in available_methods():
        cls = get_method(name)
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Config)
                           if f.default is not dataclasses.MISSING)
        print(f"{name}: {fields}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vadlab import __version__

    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                      default=argparse.SUPPRESS, help="more messages")
    logs.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                      default=argparse.SUPPRESS, help="warnings and errors only")
    parser = argparse.ArgumentParser(prog="vadlab", description="Visual anomaly detection: data, methods, metrics.")
    parser.add_argument("-v", "--verbose", dest="top_log_level", action="store_const", const=logging.DEBUG,
                        default=logging.INFO, help="more messages")
    parser.add_argument("-q", "--quiet", dest="top_log_level", action="store_const", const=logging.WARNING,
                        help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"vadlab {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    _add = verbs.add_parser

    def add_verb(*a, **kw):
        return _add(*a, parents=[logs], **kw)

    verbs.add_parser = add_verb  # every verb takes -v/-q too

    data = verbs.add_parser("data", help="datasets").add_subparsers(dest="data_verb", required=True)
    data_add = data.add_parser
    data.add_parser = lambda *a, **kw: data_add(*a, parents=[logs], **kw)
    synth = data.add_parser("synth", help="write the generated dataset in MVTec AD layout")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=_seed, default=0)
    synth.add_argument("--size", type=_positive_int, default=256, help="image size in pixels")
    synth.add_argument("--n-train", type=int, default=200)
    synth.add_argument("--n-test", type=int, default=80)
    synth.add_argument("--categories", nargs="*", help="subset of categories (default: all)")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace category folders that an earlier `vadlab data synth` wrote (never others)")
    synth.set_defaults(func=cmd_data_synth)
    elpv = data.add_parser("elpv", help="write the ELPV solar cells (pip install elpv-dataset) in MVTec layout")
    elpv.add_argument("--out", required=True, help="output folder")
    elpv.add_argument("--seed", type=int, default=0, help="seed of the train/test split of the p = 0 cells")
    elpv.add_argument("--train-fraction", type=float, default=0.8, help="share of the p = 0 cells in train/good")
    elpv.add_argument("--max-train", type=int, help="keep at most this many training images (seeded; a cost cap)")
    elpv.add_argument("--limit", type=int, help="at most this many files per folder (quick tests)")
    elpv.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    elpv.set_defaults(func=cmd_data_elpv)
    dl = data.add_parser("download", help="fetch MVTec AD, BTAD or VisA, check its SHA-256, convert to MVTec layout")
    dl.add_argument("name", choices=("mvtec", "btad", "visa"))
    dl.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    dl.add_argument("--archive", help="use this already downloaded archive instead of the network")
    dl.add_argument("--url", help="download from here instead of the dataset's published URL")
    dl.add_argument("--sha256", help="expected SHA-256 of the archive (default: the published one; '' skips)")
    dl.add_argument("--cache", help="folder that keeps the archives "
                    "(default: $VADLAB_DOWNLOADS or ~/.cache/vadlab/downloads)")
    dl.add_argument("--categories", nargs="*", help="subset of categories (default: all)")
    dl.set_defaults(func=cmd_data_download)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("method", nargs="?", help="method name, e.g. padim (see `vadlab methods`)")
        p.add_argument("--data", required=True, help="dataset root in MVTec AD layout")
        p.add_argument("--image-size", type=int, help="input size in pixels (default: the run's, else 256)")
        p.add_argument("--preset", choices=("paper", "cpu"),
                       help="paper (default) = the paper's hyperparameters; cpu = the method's small-CPU preset")
        p.add_argument("--config", help="params.yaml whose `methods:` block holds the run named by --run")
        p.add_argument("--run", help="run name in --config (its method, preset, set: and image_size)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a hyperparameter (repeatable)")
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the method's)")
        p.add_argument("--seed", type=_seed, default=0)
        p.add_argument("--batch-size", type=_positive_int, default=16)

    ev = verbs.add_parser("evaluate", help="fit on train/good and evaluate on test/")
    common(ev)
    ev.add_argument("--category", action="append", help="category (repeatable; default: every category)")
    ev.add_argument("--out", help="folder for metrics.json, predictions.npz and overlays")
    ev.add_argument("--protocol", choices=("per-category", "unified"), default="per-category")
    ev.add_argument("--save-model", action="store_true")
    ev.add_argument("--existing", choices=("refuse", "reuse", "overwrite"), default="refuse",
                    help="when --out holds a finished run: refuse (default), reuse it, or overwrite it "
                    "(an unfinished one is always redone)")
    ev.set_defaults(func=cmd_evaluate)

    fit = verbs.add_parser("fit", help="train on train/good and save the model")
    common(fit)
    fit.add_argument("--category", required=True)
    fit.add_argument("--out", required=True, help="model file (.pt); a .json with the threshold goes beside it")
    fit.add_argument("--holdout", type=float, default=0.1,
                     help="fraction of normal images held out to set the decision threshold (0 disables)")
    fit.add_argument("--quantile", type=float, default=0.99, help="threshold = this quantile of held-out scores")
    fit.set_defaults(func=cmd_fit)

    def saved(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="model file written by `vadlab fit` or `vadlab evaluate --save-model`")
        p.add_argument("--image-size", type=int, help="default: the size the model was fitted at")
        p.add_argument("--batch-size", type=_positive_int, default=16)
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the saved one; the CPU when this "
                       "machine has no CUDA)")

    te = verbs.add_parser("test", help="score a saved model on a test split: every metric, no refit")
    saved(te)
    te.add_argument("--data", required=True, help="dataset root in MVTec AD layout")
    te.add_argument("--category", help="category to test on (default: the one the model was fitted on)")
    te.add_argument("--out", help="folder for metrics.json, predictions, curves and overlays")
    te.add_argument("--existing", choices=("refuse", "reuse", "overwrite"), default="refuse",
                    help="when --out holds a finished run: refuse (default), reuse it, or overwrite it")
    te.set_defaults(func=cmd_test)

    pr = verbs.add_parser("predict", help="score new images with a saved model")
    saved(pr)
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--out", required=True, help="folder for scores.csv, maps/ and heatmaps/ (replaced)")
    pr.add_argument("--no-heatmaps", dest="heatmaps", action="store_false",
                    help="skip the heatmap PNGs (image, overlay with colour bar, score and threshold)")
    pr.set_defaults(func=cmd_predict)

    me = verbs.add_parser("methods", help="list the methods and their default hyperparameters")
    me.set_defaults(func=cmd_methods)
    return parser


class _ConsoleHandler(logging.StreamHandler):
    """Notes and results to ``sys.stdout``, warnings and errors to ``sys.stderr``, looked up at each message
    (tests and notebooks swap them)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("vadlab: %(message)s"))
        self._level = logging.INFO

    def emit(self, record: logging.LogRecord) -> None:
        self._level = record.levelno
        super().emit(record)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr if self._level >= logging.WARNING else sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("vadlab: ", "vadlab: warning: ", 1) if record.levelno >= logging.WARNING else text


def _setup_logging(level: int) -> None:
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        log.addHandler(_ConsoleHandler())
    log.setLevel(level)


def _seed(value: str) -> int:
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed {value!r} is not an integer") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed {value} is out of range: use 0 to {MAX_SEED}")
    return seed


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print one line and return 2, Ctrl-C returns 130."""
    from vadlab.backbones import WeightsUnavailableError

    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", args.top_log_level))  # after the verb wins
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("vadlab: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError, WeightsUnavailableError) as err:
        message = str(err) if not isinstance(err, OSError) or err.filename is None or str(err.filename) in str(err) \
            else f"{err.strerror or err}: {err.filename}"
        print(f"vadlab: error: {' '.join(message.split())}", file=sys.stderr)  # one line
        return 2
    except FloatingPointError as err:
        print(f"vadlab: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
