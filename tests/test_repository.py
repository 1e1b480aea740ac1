"""Both flavours of the model repository (torch runtime, TensorRT engines) parse with Triton's
model-config protobuf, and every tensor the orchestrator exchanges with a stage exists there
with the right dtype (helios_triton.contract.STAGE_CONTRACT)."""

import re

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from conftest import INSTANCES, ROOT
from helios_triton.contract import STAGE_CONTRACT
from helios_triton.fill_repository import fill, values

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
