"""DeepSpeed: the generated config, and starting it with or without a launcher.

The config is generated from the train config (ZeRO stage, precision, micro-batch, accumulation, clipping,
AdamW, linear warm-up then linear decay), then the user's raw `deepspeed:` block is merged over it key by key.
Without a launcher, `mdkd train` is rank 0 of a world of 1 on a free local port; under `torchrun` or the
`deepspeed` launcher the environment they set is used as is.
"""

from __future__ import annotations

import os
import socket

import torch

from mdkd.pipeline.train_config import TrainConfig


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 on a GPU that supports it, otherwise fp32."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged in: nested mappings merge, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def deepspeed_config(config: TrainConfig, precision: str, device: torch.device) -> dict:
    loop = config.train
    warmup_steps = int(round(loop.warmup * loop.steps))
    generated = {
        "train_micro_batch_size_per_gpu": loop.micro_batch_size,
        "gradient_accumulation_steps": loop.gradient_accumulation,
        "gradient_clipping": loop.gradient_clipping,
        "steps_per_print": 10**9,  # mdkd logs its own metrics
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": loop.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": loop.weight_decay,
                # DeepSpeed's fused Adam needs CUDA; torch's AdamW runs everywhere.
                "torch_adam": device.type != "cuda",
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": loop.steps,
                # WarmupDecayLR needs at least one warm-up step; "no warm-up" is one that starts at the full rate.
                "warmup_num_steps": max(warmup_steps, 1),
                "warmup_min_lr": 0.0 if warmup_steps else loop.lr,
                "warmup_max_lr": loop.lr,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    return deep_merge(generated, config.deepspeed)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed(device: torch.device) -> None:
    """Start torch.distributed through DeepSpeed (gloo on the CPU, nccl on GPUs)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
