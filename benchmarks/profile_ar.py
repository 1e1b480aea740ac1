"""Profile AR decode rounds (torch.profiler): where the time of one round goes.

    python benchmarks/profile_ar.py --config tiny --rounds 20
"""

import argparse

import torch


from helios.checkpoint import random_components
from helios.ar_runtime import ARRuntime
from helios.config import get_config
from helios.sampling import SamplingParams
from helios.schedule import plan_vocab_bias


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    cfg = get_config(args.config)
    dev = torch.device("cuda")
    parts = random_components(cfg, dev, torch.bfloat16)
    ar = parts["ar_backbone"]
    rt = ARRuntime(ar, None, num_blocks=64, block_size=cfg.kv_block_size, device=dev)
    prefix = torch.randn(40, ar.config.hidden_size, device=dev, dtype=torch.bfloat16)
    rt.add_sequence(0, prefix, [ar.config.bos_token_id], SamplingParams(seed=0), bias=plan_vocab_bias(ar.config))
    for _ in range(5):
        rt.step([0])
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.rounds):
            rt.step([0])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
