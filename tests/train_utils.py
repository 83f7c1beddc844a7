"""Small shared pieces of the classification tests: tiny runs on real data."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.data import ImageNetInfo

from cyclemlp.training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# A four-stage CycleMLP small enough for seconds-long CPU runs.
TINY_KWARGS = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))
TINY_ARGS = [
    "--recipe", "fashion-mnist", "--dataset", "fashion-mnist", "--model", "cyclemlp_b1",
    "--model-kwargs", "dims=(16,32,64,128)", "depths=(1,1,1,1)", "--img-size", "32",
    "--train-subset", "256", "--val-subset", "128", "-b", "32", "--no-progress",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one torch thread: tiny models gain nothing from a
    thread pool, and on a shared machine waiting for its threads dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(output: Path, **overrides) -> TrainConfig:
    """Fashion-MNIST, 256 training / 128 test images at 32x32, a 0.4M-parameter CycleMLP."""
    values = dict(
        dataset="fashion-mnist", model="cyclemlp_b1", model_kwargs=dict(TINY_KWARGS), img_size=32,
        train_subset=256, val_subset=128, batch_size=32, workers=0, epochs=2, progress=False,
        output=str(output),
    )
    values.update(overrides)
    return TrainConfig.from_recipe("fashion-mnist", **values)


CLI = [sys.executable, "-m", "cyclemlp"]


def cli_env() -> dict[str, str]:
    """The environment of CLI subprocesses: this worktree's sources first, one thread each."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def run_cli(*args: str, timeout: float = 300, check: bool = False, cmd: list[str] | None = None,
            env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m cyclemlp ARGS`` (or ``cmd + ARGS``) with this worktree's sources first (in ``env``,
    by default :func:`cli_env`)."""
    command = (cmd or CLI) + list(args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or cli_env(), cwd=ROOT,
                            **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def foolbox_imagenet() -> list[Path]:
    """The 20 labelled ImageNet photos shipped by the foolbox package (a data carrier)."""
    spec = importlib.util.find_spec("foolbox")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    return sorted(folder.glob("imagenet_*.jpg"))


def imagenet_folder(root: Path) -> Path:
    """An ImageNet-layout tree (synset folders) of the foolbox photos, the same in train/ and val/."""
    info = ImageNetInfo()
    for photo in foolbox_imagenet():
        label = int(photo.stem.split("_")[-1])
        for split in ("train", "val"):
            folder = root / split / info.index_to_label_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, folder / photo.name)
    return root
