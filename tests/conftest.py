import threading
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from helios.checkpoint import init_checkpoint
from helios.config import get_config
from helios.pipeline import HeliosPipeline
from helios_triton.fill_repository import fill, values
from helios_triton.server import TritonServer, free_ports

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


# ---- the real Triton server, shared by the serving and deployment tests ----------------------
INSTANCES = {"text_encoder": 1, "refiner": 1, "vae_decoder": 1, "helios_video": 2}


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    # overlap_decode on, as on a GPU (on a CPU it is off by default): the tests that compare
    # Triton's frames with in-process ones then cover its concurrent BLS requests.
    fill(tmp / "repo", values(tiny_checkpoint, "cpu", 4, True, INSTANCES, 0.5, overlap_decode="on"))
    http, grpc, metrics = free_ports(3)
    srv = TritonServer(tmp / "repo", http, grpc, metrics, log_file=tmp / "server.log",
                       backends=tmp / "backends")
    try:
        srv.start(timeout=240)
    except Exception:
        print((tmp / "server.log").read_text()[-5000:])
        raise
    yield srv
    srv.stop()



def metric(text, name, **labels):
    """The value of one metric line of Prometheus text, selected by its labels."""
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name}{{{sel}}} not found")


def live_metrics(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=5) as r:
        return r.read().decode()


def steer(server, session_id, prompt, at_frame=None) -> threading.Thread:
    """Send a prompt update to the stream ``session_id`` from a thread, as soon as the
    server knows the stream (the stream is usually sent just after this)."""
    from helios_client import HeliosClient

    t = threading.Thread(target=lambda: HeliosClient(f"127.0.0.1:{server.grpc}").update(
        session_id, prompt, at_frame, wait_s=60), daemon=True)
    t.start()
    return t
