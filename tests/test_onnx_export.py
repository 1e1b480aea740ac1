"""ONNX export: onnx.checker passes and ONNX Runtime matches PyTorch on fresh random inputs,
including the graph whose attention is the custom helios::ContextAttention node."""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from helios.export.onnx_export import (OPSET, RefinerStepGraph, TextEncoderGraph, VAEDecoderGraph,  # noqa: E402
                                example_inputs, export_all)
from helios import attention  # noqa: E402
from helios.checkpoint import load_component, read_config  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    return export_all(tiny_checkpoint, tmp_path_factory.mktemp("onnx"))


def _run(path_or_model, inputs: dict):
    data = path_or_model.SerializeToString() if hasattr(path_or_model, "SerializeToString") else str(path_or_model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_every_graph_passes_the_checker(exported):
    assert set(exported) == {"text_encoder", "refiner_step", "refiner_step.plugin", "vae_decoder"}
    for path in exported.values():
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == OPSET


def test_text_encoder_onnx_matches_pytorch(exported, tiny_checkpoint):
    cfg = read_config(tiny_checkpoint)
    graph = TextEncoderGraph(load_component(tiny_checkpoint, "text_encoder", cfg))
    ids, lengths = example_inputs(cfg, "text_encoder", prompt_len=37, seed=5)  # another length
    got = _run(exported["text_encoder"], {"input_ids": ids, "input_lengths": lengths})
    with torch.no_grad():
        ref = graph(ids, lengths)
    for g, r in zip(got, ref):
        assert g.shape == tuple(r.shape)
        assert _rel(g, r) < 1e-5


def _refiner_case(tiny_checkpoint):
    cfg = read_config(tiny_checkpoint)
    graph = RefinerStepGraph(load_component(tiny_checkpoint, "refiner", cfg))
    latent, sigma, k, v = example_inputs(cfg, "refiner_step", context_len=41, batch=2, seed=7)
    with torch.no_grad():
        ref = graph(latent, sigma, k, v)
    return {"latent": latent, "sigma": sigma, "context_k": k, "context_v": v}, ref


def test_refiner_step_onnx_matches_pytorch(exported, tiny_checkpoint):
    inputs, ref = _refiner_case(tiny_checkpoint)
    (got,) = _run(exported["refiner_step"], inputs)
    assert _rel(got, ref) < 1e-5


def _with_reference_function(model):
    """Give helios::ContextAttention a body of standard ops, as a model-local ONNX function,
    so that ONNX Runtime can run the plugin graph (TensorRT uses the plugin instead)."""
    h = onnx.helper
    scale = h.make_node("Constant", [], ["scale_value"])
    scale.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="scale",
                                               type=onnx.AttributeProto.FLOAT))
    nodes = [
        h.make_node("Concat", ["k_ctx", "k_self"], ["k"], axis=2),
        h.make_node("Concat", ["v_ctx", "v_self"], ["v"], axis=2),
        h.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        h.make_node("MatMul", ["q", "k_t"], ["scores"]),
        scale,
        h.make_node("Mul", ["scores", "scale_value"], ["scaled"]),
        h.make_node("Softmax", ["scaled"], ["weights"], axis=-1),
        h.make_node("MatMul", ["weights", "v"], ["out"]),
    ]
    fn = h.make_function(attention.ONNX_DOMAIN, attention.ONNX_OP,
                         ["q", "k_ctx", "v_ctx", "k_self", "v_self"], ["out"], nodes,
                         [h.make_opsetid("", OPSET)],
                         attributes=["scale", "plugin_namespace", "plugin_version"])
    model.functions.append(fn)
    return model


def test_plugin_graph_has_one_custom_node_per_block_and_matches_pytorch(exported, tiny_checkpoint):
    model = onnx.load(str(exported["refiner_step.plugin"]))
    nodes = [n for n in model.graph.node if n.op_type == attention.ONNX_OP]
    assert len(nodes) == read_config(tiny_checkpoint).refiner.num_layers
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert nodes[0].domain == "helios"
    assert attrs["plugin_namespace"] == b"helios" and attrs["plugin_version"] == b"1"
    assert abs(attrs["scale"] - read_config(tiny_checkpoint).refiner.head_dim ** -0.5) < 1e-7
    assert not any(n.op_type == "Softmax" for n in model.graph.node)  # no attention left inline
    inputs, ref = _refiner_case(tiny_checkpoint)
    (got,) = _run(_with_reference_function(model), inputs)
    assert _rel(got, ref) < 1e-5


def test_vae_decoder_onnx_matches_pytorch(exported, tiny_checkpoint):
    cfg = read_config(tiny_checkpoint)
    graph = VAEDecoderGraph(load_component(tiny_checkpoint, "vae", cfg))
    latent, prev = example_inputs(cfg, "vae_decoder", seed=9)
    (got,) = _run(exported["vae_decoder"], {"latent": latent, "prev_latent": prev})
    with torch.no_grad():
        ref = graph(latent, prev).numpy()
    assert got.dtype == np.uint8 and got.shape == (4, cfg.height, cfg.width, 3)
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # rounding at .5 may differ by one


def test_polygraphy_compares_onnxruntime_with_pytorch(exported, tiny_checkpoint, tmp_path):
    pytest.importorskip("polygraphy")
    import subprocess
    import sys
    from pathlib import Path

    from polygraphy.comparator import RunResults

    from helios.export.compare import compare

    onnx_dir = exported["text_encoder"].parent
    assert compare(tiny_checkpoint, onnx_dir, tmp_path) == \
        {"text_encoder": 0, "refiner_step": 0, "vae_decoder": 0}
    # The comparison can fail: against PyTorch outputs shifted by 1 it does.
    saved = tmp_path / "refiner_step.torch.json"
    results = RunResults.load(str(saved))
    results["pytorch"][0]["velocity"] = results["pytorch"][0]["velocity"] + 1.0
    results.save(str(saved))
    rc = subprocess.call([str(Path(sys.executable).parent / "polygraphy"), "run",
                          str(onnx_dir / "refiner_step.onnx"), "--onnxrt",
                          "--load-inputs", str(tmp_path / "refiner_step.inputs.json"),
                          "--load-outputs", str(saved)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert rc != 0


def test_tensorrt_builds_the_engines(exported, tiny_checkpoint, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT's builder is not installable here (the PyPI "
                                           "package is a stub); runs in NVIDIA's Triton image")
    from build.build_engines import main as build_main

    assert build_main(["--checkpoint", str(tiny_checkpoint), "--onnx",
                       str(exported["text_encoder"].parent), "--out", str(tmp_path)]) == 0
    assert all((tmp_path / f"{n}.plan").stat().st_size > 0
               for n in ("text_encoder", "refiner_step", "vae_decoder"))
