"""The ``vadlab`` command: one verb per job.

    vadlab data synth --out DIR [--seed N]          write the generated dataset (MVTec layout)
    vadlab data download mvtec|btad|visa --out DIR  fetch, verify and convert a real dataset to MVTec layout
    vadlab evaluate METHOD --data ROOT --category C fit on train/good, score test/, write metrics.json
    vadlab fit METHOD --data ROOT --category C --out model.pt
    vadlab predict MODEL.pt IMAGE_OR_DIR ... --out DIR
    vadlab methods                                  list methods and their hyperparameters
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _overrides(args: argparse.Namespace) -> dict:
    """The preset's hyperparameters, then each --set on top."""
    from vadlab.methods import preset_overrides

    return {**preset_overrides(args.method, args.preset), **_parse_sets(args.set)}


def _table(rows: list[dict], keys: Sequence[str]) -> str:
    """A plain-text table of ``rows`` with columns ``keys`` (floats with 3 decimals)."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("nan" if v is None else str(v))
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
        kwargs["categories"] = args.categories
    out = generate(args.out, **kwargs)
    print(f"wrote the generated dataset to {out}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from vadlab.data.download import download

    out = download(args.name, args.out, url=args.url or None, sha256=args.sha256, archive=args.archive,
                   cache=args.cache, categories=tuple(args.categories) if args.categories else None)
    print(f"wrote {args.name} in MVTec layout to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vadlab.data import list_categories
    from vadlab.evaluate import METRIC_KEYS, run, run_unified

    overrides = _overrides(args)
    categories = args.category or list_categories(args.data)
    keys = ("category",) + METRIC_KEYS + ("fit_seconds", "predict_seconds_per_image")
    rows = []
    if args.protocol == "unified":
        results = run_unified(args.method, args.data, categories, args.image_size, overrides, args.out, args.seed,
                              args.batch_size)
        rows = list(results.values())
    else:
        for category in categories:
            out = None if args.out is None else (Path(args.out) / category if len(categories) > 1 else Path(args.out))
            rows.append(run(args.method, args.data, category, args.image_size, overrides, out, args.seed,
                            args.batch_size, save_model=args.save_model))
    if len(rows) > 1:
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys[1:]}
        rows.append({"category": "mean", **mean})
    print(f"{args.method} ({args.protocol}, {args.image_size} px, seed {args.seed})")
    print(_table(rows, keys))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torch.utils.data import Subset

    from vadlab.data import MVTecDataset, make_loader
    from vadlab.evaluate import build_method, predict_dataset, seed_everything

    seed_everything(args.seed)
    train = MVTecDataset(args.data, args.category, "train", args.image_size)
    n_hold = int(round(len(train) * args.holdout))
    if n_hold and len(train) - n_hold < 2:
        raise SystemExit(f"--holdout {args.holdout} leaves fewer than 2 training images of {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    fit_set, hold_set = Subset(train, order[n_hold:]), Subset(train, order[:n_hold])
    model = build_method(args.method, _overrides(args), args.seed)
    model.fit(make_loader(fit_set, batch_size=args.batch_size, shuffle=True, seed=args.seed))
    out = Path(args.out)
    model.save(out)
    info = {"method": args.method, "image_size": args.image_size, "category": args.category, "data": str(args.data)}
    if n_hold:
        held = predict_dataset(model, hold_set, args.batch_size, desc="held-out normals")["scores"]
        info.update(threshold=float(np.quantile(held, args.quantile)), threshold_quantile=args.quantile,
                    n_holdout=n_hold)
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {args.method} to {out} (+ {out.with_suffix('.json').name})")
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
            raise SystemExit(f"no such image or folder: {p}")
    if not files:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(inputs)}")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vadlab.data.mvtec import load_image
    from vadlab.methods import AnomalyMethod

    model = AnomalyMethod.load(args.model)
    info_path = Path(args.model).with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    size = args.image_size or info.get("image_size", 256)
    threshold = info.get("threshold")
    out = Path(args.out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    files = _image_files(args.images)
    rows = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        images = torch.stack([load_image(f, size) for f in chunk])
        scores, maps = model.predict(images)
        for i, (f, s, m) in enumerate(zip(chunk, scores.tolist(), maps.cpu().numpy()), start):
            map_file = out / "maps" / f"{i:05d}_{f.stem}.npy"  # numbered: folders may repeat file names
            np.save(map_file, m.astype(np.float32))
            rows.append({"image": str(f), "map": str(map_file.relative_to(out)), "score": s,
                         "anomalous": "" if threshold is None else int(s > threshold)})
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "map", "score", "anomalous"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"scored {len(rows)} images -> {out / 'scores.csv'}"
          + ("" if threshold is None else f" (threshold {threshold:.4g} from held-out normal images)"))
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
    parser = argparse.ArgumentParser(prog="vadlab", description="Visual anomaly detection: data, methods, metrics.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="datasets").add_subparsers(dest="data_verb", required=True)
    synth = data.add_parser("synth", help="write the generated dataset in MVTec AD layout")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256, help="image size in pixels")
    synth.add_argument("--n-train", type=int, default=200)
    synth.add_argument("--n-test", type=int, default=80)
    synth.add_argument("--categories", nargs="*", help="subset of categories (default: all)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    synth.set_defaults(func=cmd_data_synth)
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
        p.add_argument("method", help="method name, e.g. padim (see `vadlab methods`)")
        p.add_argument("--data", required=True, help="dataset root in MVTec AD layout")
        p.add_argument("--image-size", type=int, default=256)
        p.add_argument("--preset", choices=("paper", "cpu"), default="paper",
                       help="paper = the paper's hyperparameters; cpu = the method's small-CPU preset")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a hyperparameter (repeatable)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=16)

    ev = verbs.add_parser("evaluate", help="fit on train/good and evaluate on test/")
    common(ev)
    ev.add_argument("--category", action="append", help="category (repeatable; default: every category)")
    ev.add_argument("--out", help="folder for metrics.json, predictions.npz and overlays")
    ev.add_argument("--protocol", choices=("per-category", "unified"), default="per-category")
    ev.add_argument("--save-model", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    fit = verbs.add_parser("fit", help="train on train/good and save the model")
    common(fit)
    fit.add_argument("--category", required=True)
    fit.add_argument("--out", required=True, help="model file (.pt); a .json with the threshold goes beside it")
    fit.add_argument("--holdout", type=float, default=0.1,
                     help="fraction of normal images held out to set the decision threshold (0 disables)")
    fit.add_argument("--quantile", type=float, default=0.99, help="threshold = this quantile of held-out scores")
    fit.set_defaults(func=cmd_fit)

    pr = verbs.add_parser("predict", help="score new images with a saved model")
    pr.add_argument("model", help="model file written by `vadlab fit`")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--out", required=True, help="folder for scores.csv and maps/")
    pr.add_argument("--image-size", type=int, help="default: the size the model was fitted at")
    pr.add_argument("--batch-size", type=int, default=16)
    pr.set_defaults(func=cmd_predict)

    me = verbs.add_parser("methods", help="list the methods and their default hyperparameters")
    me.set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as err:
        print(f"vadlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
