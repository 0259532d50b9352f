"""The paper-scale params sets (configs/<dataset>.yaml): valid settings, applied cleanly, runnable end to end.

The runs use a few generated images in MVTec layout, named like the set's first category, at 32 px with
one epoch; the papers' backbones (whose weights are not cached offline) are checked for their layer
names and run once with random weights, the other methods run with the offline EfficientNet-Lite0.
"""

import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from vadlab.data import generate
from vadlab.data.download import SOURCES, check_dataset
from vadlab.evaluate import _claim_gpu, resolve_device, run, run_unified
from vadlab.methods import apply_overrides, get_method, preset_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {name: yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()) for name in ("mvtec", "btad", "visa")}
PARAMS_TEXT = (ROOT / "params.yaml").read_text()
PARAMS = yaml.safe_load(PARAMS_TEXT)

#: per method: the fields a 32 px, one-epoch smoke run changes (everything else stays the paper set's)
TINY: dict[str, dict] = {
    "padim": {"n_features": 32},
    "semi_orthogonal": {"k": 32},
    "patchcore": {},
    "cflow": {"meta_epochs": 1, "sub_epochs": 1, "warmup_epochs": 0, "coupling_blocks": 2},
    "pyramidflow": {"epochs": 1, "levels": 3},
    "ae_ssim": {"image_size": 32, "epochs": 1},
    "riad": {"image_size": 32, "epochs": 1},
    "favae": {"image_size": 32, "epochs": 1},
    "mkd": {"image_size": 32, "epochs": 1},
    "dmad": {"image_size": 32, "epochs": 1},
    "diad": {"ae_steps": 2, "ldm_steps": 2, "sg_steps": 2},
}
LITE0 = "efficientnet_lite0"


def _apply_module():
    spec = importlib.util.spec_from_file_location("configs_apply", ROOT / "configs" / "apply.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _overrides(settings: dict) -> tuple[str, dict]:
    """(implementation, hyperparameters) of one run, exactly as pipeline/evaluate.py builds them."""
    name = settings.get("method")
    return name, {**preset_overrides(name, settings.get("preset", "paper")), **(settings.get("set") or {})}


def _tiny(name: str, overrides: dict) -> dict:
    """The paper overrides, shrunk for a CPU smoke run: Lite0 for the papers' backbones, widths for DiAD."""
    out = dict(overrides)
    if out.get("backbone", LITE0) != LITE0:
        out["backbone"] = LITE0
        out.pop("layers", None)  # the Config's default layers are Lite0's
    if name == "diad":
        defaults = get_method("diad").Config()
        for key in ("ae_channels", "ae_channel_mult", "ae_res_blocks", "model_channels", "channel_mult",
                    "num_res_blocks", "attention_resolutions", "num_heads", "hint_channels"):
            out[key] = getattr(defaults, key)
    return {**out, **TINY[name]}


def _runs(config: dict) -> dict[str, dict]:
    return {run_name: {"method": run_name, **config["methods"][run_name]}
            for run_name in list(config["run_methods"]) + list(config["unified_methods"])}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_matches_dataset_and_params(name):
    config, src = CONFIGS[name], SOURCES[name]
    assert set(config) <= set(PARAMS), f"configs/{name}.yaml names keys params.yaml lacks: {set(config) - set(PARAMS)}"
    assert config["data"]["name"] == name and tuple(config["data"]["categories"]) == src.categories
    assert config["downloads"] == {name: {"url": src.url, "sha256": src.sha256}}
    assert config["data"]["root"] == f"build/datasets/{name}"  # the download stage's output (dvc.yaml)
    for run_name, settings in _runs(config).items():
        impl, overrides = _overrides(settings)
        assert settings["preset"] == "paper" and overrides["device"] == "auto", run_name
        cls = get_method(impl)
        known = {f.name for f in fields(cls.Config)}
        assert set(overrides) <= known, f"{name}/{run_name}: unknown hyperparameters {set(overrides) - known}"
        config_obj = apply_overrides(cls.Config(), {**overrides, "device": resolve_device(overrides["device"])})
        assert config_obj.device == resolve_device("auto")
        if "image_size" in known:  # methods that resize internally get the paper size as input size
            assert config_obj.image_size == settings["image_size"], run_name


def test_paper_backbones_and_layers_exist():
    """Every (backbone, layers) the sets name is a real feature layer of that timm model, shallow to deep."""
    import timm

    from vadlab.backbones import backbone_spec

    wanted: dict[str, set] = {}
    for config in CONFIGS.values():
        for settings in _runs(config).values():
            impl, ov = _overrides(settings)
            if "backbone" in ov and "layers" in ov:
                wanted.setdefault(ov["backbone"], set()).add(tuple(ov["layers"]))
    assert set(wanted) == {"wide_resnet50_2", "resnet50"}
    for backbone, layer_sets in wanted.items():
        with torch.device("meta"):
            names = timm.create_model(backbone_spec(backbone).timm_name, features_only=True).feature_info.module_name()
        for layers in layer_sets:
            assert all(layer in names for layer in layers), (backbone, layers, names)
            assert [names.index(layer) for layer in layers] == sorted(names.index(layer) for layer in layers)


def test_diad_paper_widths_build():
    """DiAD's paper widths give the SD-size denoiser (hundreds of millions of parameters), built on meta."""
    from vadlab.methods.diad import parameter_counts

    _, overrides = _overrides({"method": "diad", **CONFIGS["mvtec"]["methods"]["diad"]})
    cfg = get_method("diad").Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()
                                       if k != "device"})
    counts = parameter_counts(cfg)
    assert counts["denoiser"] > 300e6 and counts["total"] > counts["denoiser"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """One generated category copied under each set's first category name (MVTec layout, 32 px)."""
    import shutil

    root = tmp_path_factory.mktemp("paper")
    gen = generate(tmp_path_factory.mktemp("gen"), seed=0, categories=["brick"], n_train=6, n_test=6, size=32)
    for config in CONFIGS.values():
        shutil.copytree(gen / "brick", root / config["data"]["name"] / config["data"]["categories"][0])
    return root


def test_every_run_of_every_set_runs_end_to_end(tiny_root):
    """Each distinct run setting of the three sets: fit + predict + metrics on the tiny folder."""
    done: dict[str, dict] = {}
    for name, config in CONFIGS.items():
        data_root, category = tiny_root / name, config["data"]["categories"][0]
        for run_name, settings in _runs(config).items():
            impl, overrides = _overrides(settings)
            key = repr((impl, sorted(overrides.items())))
            if key in done:
                continue
            tiny = _tiny(impl, overrides)
            if run_name in config["unified_methods"] and run_name not in config["run_methods"]:
                metrics = run_unified(impl, data_root, [category], image_size=32, overrides=tiny, seed=0)[category]
            else:
                metrics = run(impl, data_root, category, image_size=32, overrides=tiny, seed=0)
            assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0, run_name
            assert metrics["config"]["device"] == resolve_device("auto"), run_name
            done[key] = metrics
    assert {m["method"] for m in done.values()} == set(TINY)


def test_paper_backbone_runs_with_random_weights(tiny_root):
    """PaDiM exactly as configs/mvtec.yaml sets it (WRN-50 layers 1-3, d = 550), random weights, 32 px."""
    _, overrides = _overrides({"method": "padim", **CONFIGS["mvtec"]["methods"]["padim"]})
    metrics = run("padim", tiny_root / "mvtec", "bottle", image_size=32, overrides={**overrides, "weights": "random"})
    assert metrics["config"]["backbone"] == "wide_resnet50_2" and metrics["config"]["n_features"] == 550
    assert metrics["n_parameters"] > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_missing_data_fails_clearly(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the set's relative data.root does not exist here
    config = CONFIGS[name]
    with pytest.raises(FileNotFoundError, match=rf"{config['data']['root']}.*vadlab data download {name}"):
        check_dataset(config["data"]["root"], config["data"]["categories"], name)
    with pytest.raises(FileNotFoundError, match=config["data"]["root"]):
        run("padim", config["data"]["root"], config["data"]["categories"][0], image_size=32)


def test_apply_replaces_only_the_named_blocks(tmp_path):
    apply = _apply_module().apply
    text = apply(PARAMS_TEXT, (ROOT / "configs" / "mvtec.yaml").read_text())
    merged = yaml.safe_load(text)
    assert merged == {**PARAMS, **CONFIGS["mvtec"]}
    untouched = [k for k in PARAMS if k not in CONFIGS["mvtec"]]
    out_lines = text.splitlines()
    for key in untouched:  # other keys keep their line, inline comment included
        line = next(line for line in PARAMS_TEXT.splitlines() if line.startswith(f"{key}:"))
        assert line in out_lines, key
    comments = [line for line in PARAMS_TEXT.splitlines() if line.startswith("#")]
    assert comments and all(c in out_lines for c in comments)  # top-level comments survive
    with pytest.raises(KeyError, match="naem"):
        apply(PARAMS_TEXT, "naem: x\n")


def test_device_auto_and_one_gpu_per_process(tmp_path, monkeypatch):
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use device auto"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu7")
    # GPU claims: each "process" (a fresh claim state, the earlier lock still held) gets the next free GPU
    import vadlab.evaluate as ev

    monkeypatch.setattr(ev, "_CLAIMED_GPU", {})  # this process's real claim state is restored afterwards

    handles = []
    for expected in (0, 1):
        ev._CLAIMED_GPU.clear()
        assert _claim_gpu(2, ["uuid-a", "uuid-b"], tmp_path) == expected
        assert _claim_gpu(2, ["uuid-a", "uuid-b"], tmp_path) == expected  # the same process keeps its GPU
        handles.append(ev._CLAIMED_GPU["handle"])
    ev._CLAIMED_GPU.clear()
    assert _claim_gpu(2, ["uuid-a", "uuid-b"], tmp_path) in (0, 1)  # all taken: shared
    assert "handle" not in ev._CLAIMED_GPU
    handles[0].close()  # the first process ends: its GPU is free again
    ev._CLAIMED_GPU.clear()
    assert _claim_gpu(2, ["uuid-a", "uuid-b"], tmp_path) == 0
    ev._CLAIMED_GPU["handle"].close()
    handles[1].close()


def test_device_auto_picks_a_free_gpu_per_process(tmp_path, monkeypatch):
    """With two (simulated) GPUs, two processes resolving `auto` get cuda:0 and cuda:1, keyed by GPU UUID."""
    from types import SimpleNamespace

    import vadlab.evaluate as ev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"GPU-{i}"))
    monkeypatch.setenv("VADLAB_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(ev, "_CLAIMED_GPU", {})
    assert resolve_device("auto") == "cuda:0"
    first = ev._CLAIMED_GPU["handle"]
    ev._CLAIMED_GPU.clear()  # a second process
    assert resolve_device("auto") == "cuda:1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-GPU-0.lock", "gpu-GPU-1.lock"]
    ev._CLAIMED_GPU["handle"].close()
    first.close()
