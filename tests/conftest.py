import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ and model_repository/ are layers beside the package

from helios.checkpoint import init_checkpoint
from helios.config import get_config
from helios.pipeline import HeliosPipeline

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def pipe(tiny_checkpoint):
    return HeliosPipeline.from_checkpoint(tiny_checkpoint)


@pytest.fixture
def tiny_config():
    return get_config("tiny")
