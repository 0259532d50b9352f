"""Datasets: MVTec-layout folders, the generated default dataset, and one-class digit tasks."""

from vadlab.data.digits import DigitsOneClass, MNISTOneClass
from vadlab.data.download import check_dataset
from vadlab.data.download import download as download_dataset
from vadlab.data.mvtec import MVTecDataset, UnifiedDataset, list_categories, make_loader
from vadlab.data.synthetic import DEFECT_KINDS, SYNTH_CATEGORIES, generate, render_sample

__all__ = [
    "MVTecDataset",
    "UnifiedDataset",
    "list_categories",
    "make_loader",
    "generate",
    "render_sample",
    "SYNTH_CATEGORIES",
    "DEFECT_KINDS",
    "DigitsOneClass",
    "MNISTOneClass",
    "download_dataset",
    "check_dataset",
]
