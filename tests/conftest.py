"""Test-session settings shared by every test file."""

import pytest
import torch

# One intra-op thread: the tests use small tensors, where a second thread gains little, and on a busy
# 2-core machine OpenMP threads spin-wait for each other and a one-minute test can take half an hour.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_tensors(tmp_path_factory):
    """Factory: a generated category as tensors (train images, test images, test labels, test masks).

    Images are drawn at ``size`` px and read at ``read_size`` px (antialiased).
    """

    def make(category: str, n_train: int, n_test: int, size: int, read_size: int):
        from vadlab.data import MVTecDataset, generate

        root = generate(tmp_path_factory.mktemp("synth"), seed=0, categories=[category], n_train=n_train,
                        n_test=n_test, size=size)
        train = MVTecDataset(root, category, "train", read_size)
        test = [item for item in MVTecDataset(root, category, "test", read_size)]
        return (torch.stack([item["image"] for item in train]), torch.stack([t["image"] for t in test]),
                torch.tensor([t["label"] for t in test]), torch.stack([t["mask"][0] for t in test]))

    return make


@pytest.fixture(scope="session")
def fake_vgg16_hub(tmp_path_factory):
    """A torch-hub folder whose cached VGG16 ImageNet checkpoint is a random-weight stand-in.

    Returns ``(hub_dir, features)``: point ``torch.hub.get_dir`` at ``hub_dir`` (monkeypatch) and the
    vadlab backbones load the file as if the real weights were cached, fully offline; ``features`` is
    the torchvision ``vgg16().features`` module holding the same weights, as a reference.  Only the
    convolutional part is written (the backbones never use the classifier), which keeps it at 59 MB.
    """
    import torchvision
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"]).eval()
    hub = tmp_path_factory.mktemp("hub")
    (hub / "checkpoints").mkdir()
    name = torchvision.models.get_model_weights("vgg16").IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, hub / "checkpoints" / name)
    return hub, features


@pytest.fixture(scope="session")
def brick_washer_loaders(synth_tensors):
    """Factory: per category (brick, washer), a seeded shuffling loader over 40 normal training images,
    40 test images and their labels, at ``size`` px (the flow tests' data)."""

    def make(size: int) -> dict:
        from torch.utils.data import DataLoader

        out = {}
        for category in ("brick", "washer"):
            train, images, labels, _ = synth_tensors(category, 40, 40, size, size)
            loader = DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
            out[category] = (loader, images, labels.tolist())
        return out

    return make


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    """A small generated MVTec-layout folder (brick: 12 training, 8 test images, 64 px), read-only for tests."""
    from vadlab.data import generate

    folder = tmp_path_factory.mktemp("mvtec")
    generate(folder, seed=1, categories=["brick"], n_train=12, n_test=8, size=64)
    return folder
