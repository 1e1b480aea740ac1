"""Both flavours of the model repository (torch runtime, TensorRT engines) parse with Triton's
model-config protobuf, and every tensor the orchestrator exchanges with a stage exists there
with the right dtype (helios_triton.contract.STAGE_CONTRACT)."""

import re
import subprocess
import sys

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from conftest import INSTANCES, ROOT
from helios_triton.contract import STAGE_CONTRACT
from helios_triton.fill_repository import fill, main, values
from helios_triton.server import prepare_backends

DTYPE = model_config_pb2.DataType


def _filled(checkpoint, tmp_path, flavour):
    configs = fill(tmp_path / flavour, values(checkpoint, "cuda", 4, True, INSTANCES, 0.3, flavour,
                                              tmp_path / "engines"), flavour=flavour)
    parsed = {}
    for path in configs:
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == path.parent.name
        parsed[cfg.name] = cfg
    return parsed


@pytest.mark.parametrize("flavour", ["torch", "tensorrt"])
def test_every_stage_speaks_the_orchestrators_contract(tiny_checkpoint, tmp_path, flavour):
    parsed = _filled(tiny_checkpoint, tmp_path, flavour)
    table = "TYPE_FP16" if flavour == "tensorrt" else "TYPE_FP32"
    for model, contract in STAGE_CONTRACT.items():
        cfg = parsed[model]
        for kind in ("inputs", "outputs"):
            declared = {t.name: DTYPE.Name(t.data_type)
                        for t in (cfg.input if kind == "inputs" else cfg.output)}
            for name, dtype in contract[kind].items():
                assert name in declared, f"{flavour}: {model} has no {kind[:-1]} {name}"
                assert declared[name] == (table if dtype == "TABLE" else dtype), (flavour, model, name)
    # The orchestrator's BLS calls name exactly these tensors.
    source = (ROOT / "helios_triton" / "bls.py").read_text()
    sent = set(re.findall(r'_t\("([a-z_]+)"', source)) | set(re.findall(r'"([a-z_]+)"\]\)', source))
    for model, contract in STAGE_CONTRACT.items():
        for name in contract["inputs"]:
            if name != "PROMPT":
                assert name in sent, f"the orchestrator never sends {model}.{name}"


def test_tensorrt_flavour_uses_engines(tiny_checkpoint, tmp_path):
    parsed = _filled(tiny_checkpoint, tmp_path, "tensorrt")
    for model in ("text_encoder", "vae_decoder", "refiner_step"):
        assert parsed[model].platform == "tensorrt_plan"
        assert parsed[model].default_model_filename == f"{model}.plan"
    ar = parsed["ar_backbone"]
    assert ar.backend == "tensorrtllm" and ar.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in ar.parameters.items()}
    assert params["gpt_model_path"] == str(tmp_path / "engines" / "ar_backbone")
    assert params["exclude_input_in_output"] == "true"  # responses carry only new tokens
    assert parsed["helios"].backend == "python"         # the orchestrator is unchanged
    helios_params = {k: v.string_value for k, v in parsed["helios"].parameters.items()}
    assert helios_params["speculative"] == "off"
    # The refiner engine's context tensors match the checkpoint's refiner.
    ctx = {t.name: list(t.dims) for t in parsed["refiner_step"].input}["context_k"]
    assert ctx == [4, -1, 4, -1, 32]


@pytest.mark.parametrize("device,option,expected", [("cuda", "auto", "on"), ("cpu", "auto", "off"),
                                                    ("cpu", "on", "on"), ("cuda", "off", "off")])
def test_overlap_decode_follows_the_device_unless_given(tiny_checkpoint, tmp_path, device, option,
                                                        expected):
    """helios decodes beside the next rendering on a GPU, where it pays, and not on a CPU,
    where the two stages would share the same cores; --overlap-decode overrides either."""
    (path,) = [p for p in fill(tmp_path / "repo", values(
        tiny_checkpoint, device, 4, False, INSTANCES, 0.3, overlap_decode=option))
        if p.parent.name == "helios"]
    cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    assert cfg.parameters["overlap_decode"].string_value == expected


@pytest.mark.parametrize("args,line", [
    (["--max-streams", "0"], "max-streams must be in [1, 32], got 0"),
    (["--max-streams", "33"], "max-streams must be in [1, 32], got 33"),
    (["--refiner-instances", "0"], "refiner-instances must be in [1, 16], got 0"),
    (["--helios-video-instances", "17"], "helios-video-instances must be in [1, 16], got 17"),
    (["--kv-cache-free-gpu-mem-fraction", "1.5"],
     "kv-cache-free-gpu-mem-fraction must be in (0, 1], got 1.5"),
    (["--kv-cache-free-gpu-mem-fraction", "nan"],
     "kv-cache-free-gpu-mem-fraction must be in (0, 1], got nan")])
def test_counts_out_of_range_are_refused_in_one_line(tiny_checkpoint, tmp_path, capsys, args, line):
    """A server filled for no stream, no instance or more KV memory than the GPU has would fail
    at load, far from the option that caused it: the fill refuses it, naming the option."""
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "repo"), *args]) == 2
    assert capsys.readouterr().err == f"fill_repository: error: {line}\n"
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("model,torch_expected", [("tokenizer", False), ("helios_update", False),
                                                  ("helios_video", False), ("helios", False),
                                                  ("refiner", True)])
def test_the_front_models_start_without_torch(model, torch_expected, tmp_path):
    """Each stub process imports its own model.py. The models that only check a request and
    pass it on, and ``helios``, which runs the orchestrator over the stage models (one
    instance a stream), must not import torch (about 3 s of CPU per stub at a server's start);
    the refiner, which runs it, shows that the check sees it. Imported as a stub imports it, beside
    the python backend's own utils module, in a fresh interpreter."""
    utils = prepare_backends(tmp_path / "backends") / "python"
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
            "spec = importlib.util.spec_from_file_location('model', sys.argv[2]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(utils),
                          str(ROOT / "model_repository" / model / "1" / "model.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(torch_expected)

