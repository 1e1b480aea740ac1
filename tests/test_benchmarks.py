"""benchmarks/fps.py on the CPU: the numbers it divides by and the table it writes.

The GPU runs of this script (docs/performance.md) report each stage next to its floor; the
refiner's floor is its FLOP count over the measured matrix rate. These tests check that count
against what the 14b refiner really executes, and run the whole benchmark on the tiny config
with every option that changes its output (speculative costs, FP8 errors).
"""

import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from helios.config import get_config
from helios.refiner import Refiner, render_flops


def test_refiner_flop_floor_counts_what_the_14b_render_executes():
    """A full-context 14b render on the meta device (no memory, no arithmetic) under torch's
    FLOP counter: its matrix products are the floor's FLOPs. SDPA runs its math path so that
    the counter sees the context encoding's attention as matmuls too."""
    cfg = get_config("14b")
    with torch.device("meta"):
        refiner = Refiner(cfg.refiner)
    z = torch.empty(1, cfg.refiner.latent_channels, cfg.latent_height, cfg.latent_width,
                    device="meta")
    plan = torch.zeros(1, cfg.refiner.plan_tokens_per_frame, dtype=torch.long, device="meta")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        refiner.render(z, plan, z, [z] * cfg.refiner.history_frames)
    counted = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    total, projections, tokens, context = render_flops(cfg)
    assert (tokens, context) == (3600, 884)
    # Attention: every score and value product of the 3 steps and the context encoding.
    assert counted["aten.bmm"] == total - projections
    # Linear layers: the blocks' four projections, plus the adaLN modulation, the time
    # embedding and the final projection, which the floor leaves out (0.03 %).
    assert projections <= counted["aten.addmm"] < projections * 1.001
    assert total == pytest.approx(fc.get_total_flops(), rel=1e-3)
    assert total == pytest.approx(31.59e12, rel=1e-3)


def test_fps_benchmark_writes_stages_speculative_costs_and_fp8_errors(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fps.py"), "--config", "tiny", "--device",
         "cpu", "--seconds", "0.5", "--speculative", "on", "--ar-fp8", "--refiner-fp8",
         "--overlap-decode", "on", "--out", str(tmp_path), "--tag", "t"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "stage" in out and "median ms" in out and "FPS" in out
    r = json.loads((tmp_path / "fps_tiny_cpu_t.json").read_text())
    cfg = get_config("tiny")
    assert (r["video_frames"], r["latent_frames"]) == (12, 3)
    assert r["overlap_decode"] and "decodes overlapped" in out
    assert r["fps"] == pytest.approx(r["video_frames"] / r["wall_s"])
    assert 0 < r["first_frame_s"] < r["wall_s"]
    # Every stage ran before the first frame, and within its time.
    parts = r["first_frame_stage_ms"]
    assert set(parts) == {"text_encoder", "ar_round", "refiner", "vae_decoder"}
    assert all(0 < v < r["first_frame_s"] * 1e3 for v in parts.values())
    assert set(r["median_ms"]) == {"text_encoder", "ar_round", "refiner", "vae_decoder"}
    assert all(v > 0 for v in r["median_ms"].values())

    spec = r["speculative_costs"]
    k, n = cfg.num_draft_tokens, cfg.plan_tokens_per_frame
    assert spec["k"] == k and spec["draft_step_ms"] > 0 and spec["verify_ms"] > 0
    assert 0 <= spec["measured_acceptance"] <= 1
    assert [row["acceptance"] for row in spec["table"]] == [0.5, 0.7, 0.9]
    for row in spec["table"]:
        a = row["acceptance"]
        # The accepted prefix of k drafts has i + 1 tokens with probability a^i (1 - a), and
        # k + 1 with a^k: the mean is the sum of a^i for i = 0..k.
        assert row["tokens_per_round"] == pytest.approx(sum(a ** i for i in range(k + 1)))
        rounds = n / row["tokens_per_round"]
        assert row["ar_ms_per_latent_frame"] == pytest.approx(
            rounds * (k * spec["draft_step_ms"] + spec["verify_ms"]))
        assert row["fps"] == pytest.approx(
            cfg.frames_per_latent * 1e3 / (row["ar_ms_per_latent_frame"] + spec["refiner_plus_vae_ms"]))
    assert [row["fps"] for row in spec["table"]] == sorted(row["fps"] for row in spec["table"])

    # FP8 errors against the unquantized weights: small but not zero.
    assert 0 < r["refiner_fp8"]["relative_l2"] < 0.1 and r["refiner_fp8"]["bytes_saved"] > 0
    assert 0 < r["ar_fp8"]["relative_l2"] < 0.2 and 0.5 <= r["ar_fp8"]["top1_agreement"] <= 1
    assert r["ar_fp8"]["positions"] == 64


@pytest.mark.parametrize("script", sorted(p.name for p in ROOT.joinpath("benchmarks").glob("*.sh")))
def test_gpu_measurement_scripts_parse(script):
    """The scripts that run the GPU measurements cannot run here; they must at least parse."""
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


def test_memory_account_sums_segments_by_stream_and_pool_and_live_blocks_by_project_line():
    """benchmarks/server_memory.py reads the allocator's snapshot (the format of
    ``torch.cuda.memory._snapshot``): reserved bytes by CUDA stream and pool, live bytes by
    the innermost frame of the project's code; free blocks count as reserved, not live."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from server_memory import account

    mib = 1 << 20
    torch_frame = {"filename": "/venv/torch/nn/modules/linear.py", "line": 125, "name": "forward"}
    ours = {"filename": "/repo/helios/kv_cache.py", "line": 226, "name": "read"}
    outer = {"filename": "/repo/helios/pipeline.py", "line": 40, "name": "generate"}
    snapshot = {"segments": [
        {"total_size": 6 * mib, "stream": 0, "segment_pool_id": (0, 0), "blocks": [
            {"state": "active_allocated", "size": 2 * mib, "frames": [torch_frame, ours, outer]},
            {"state": "active_allocated", "size": 1 * mib, "frames": [torch_frame]},
            {"state": "inactive", "size": 3 * mib, "frames": [ours]}]},
        {"total_size": 4 * mib, "stream": 0x2F, "segment_pool_id": (1, 0), "blocks": [
            {"state": "active_allocated", "size": 4 * mib, "frames": [ours]}]},
        {"total_size": 2 * mib, "stream": 0, "segment_pool_id": (0, 0), "blocks": []}]}
    acc = account(snapshot)
    assert acc["reserved_by_stream_and_pool_mib"] == {"stream 0x0, pool (0, 0)": 8.0,
                                                      "stream 0x2f, pool (1, 0)": 4.0}
    assert acc["live_by_source_mib"] == {"helios/kv_cache.py:226 read": 6.0,
                                         "(outside the project)": 1.0}


def test_kernel_kinds_of_the_stage_profile():
    """benchmarks/profile_stages.py sums kernels by kind from their names, as the H200's
    profiler named them; an Inductor kernel that fused the ops around attention is not
    attention."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_stages import kind_of

    assert kind_of("_context_attention_kernel") == "attention"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert kind_of("nvjet_sm90_tst_256x112_64x4_2x1_v_bz_coopA_bias_TNT") == "matmul"
    assert kind_of("void gemmSN_NN_kernel<float, 128, 2, 4, 8, 5, 4, false>") == "matmul"
    assert kind_of("triton_red_fused__to_copy_add_context_attention_mean_mul_permute_pow") == \
        "fused (Inductor)"
    assert kind_of("void at::native::CatArrayBatchedCopy<at::native::OpaqueType<2>>") == "copy"
    assert kind_of("void at::native::index_elementwise_kernel<128, 4>") == "other"


def test_the_stage_profile_keeps_each_kernels_launch_shape():
    """profile_stages.py reads each kernel's grid, block, registers and shared memory from the
    profiler's Chrome trace (the first launch of each name), so that two compiles of one
    kernel that run at different speeds can be told apart; CPU operators are not kernels."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_stages import launch_shapes

    name = "triton_red_fused__unsafe_view_add_mm_mul_silu_split_t_view_9"
    kernel = {"ph": "X", "cat": "kernel", "name": name, "dur": 41.9,
              "args": {"grid": [1728, 1, 1], "block": [256, 1, 1], "registers per thread": 40,
                       "shared memory": 0, "stream": 7, "correlation": 12}}
    trace = {"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "args": {"grid": [1, 1, 1]}},
        kernel,
        dict(kernel, args=dict(kernel["args"], grid=[864, 1, 1])),  # a later launch
        {"ph": "X", "cat": "kernel", "name": "void at::native::vectorized_elementwise_kernel",
         "args": {"grid": [528, 1, 1], "block": [128, 1, 1]}}]}
    assert launch_shapes(trace) == {
        name: {"grid": [1728, 1, 1], "block": [256, 1, 1], "registers": 40, "shared_memory": 0},
        "void at::native::vectorized_elementwise_kernel": {"grid": [528, 1, 1],
                                                            "block": [128, 1, 1]}}
    assert launch_shapes({}) == {}


@pytest.mark.parametrize("script", ["profile_stages.py", "sm_partition.py"])
def test_cuda_only_benchmarks_import_what_they_share(script):
    """profile_stages.py and sm_partition.py need a GPU to measure; here their imports (the
    builders sm_partition.py takes from profile_stages.py, the timing from fps.py) resolve and
    their options print."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    assert "--config" in out and "--out" in out
    if script == "sm_partition.py":
        assert "--ar-sms" in out and "--without-cudnn" in out
