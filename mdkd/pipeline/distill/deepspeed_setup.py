"""DeepSpeed: the generated config, and starting it with or without a launcher.

The config is generated from the train config (ZeRO stage, precision, micro-batch, accumulation, clipping,
AdamW), then the user's raw `deepspeed:` block is merged over it key by key. The learning-rate schedule (linear
warm-up, then linear decay to 0) is mdkd's own `linear_schedule`, handed to DeepSpeed as its client scheduler
(and checkpointed by it); DeepSpeed's WarmupDecayLR spends its first two steps at lr 0 and, with no warm-up,
never decays. A `scheduler` in the raw block replaces mdkd's.
Without a launcher, `mdkd train` is rank 0 of a world of 1 on a free local port; under `torchrun` or the
`deepspeed` launcher the environment they set is used as is.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from datetime import timedelta

import torch

from mdkd.pipeline.distill.config import TrainConfig


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
        merged[key] = (
            deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def deepspeed_config(config: TrainConfig, precision: str, device: torch.device) -> dict:
    loop = config.train
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
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    if not torch.distributed.is_initialized():
        # On the CPU DeepSpeed compiles its shared-memory collective op at first use and prints that it did, on
        # every rank; a failed build raises, so the line says nothing a user needs.
        with contextlib.redirect_stdout(io.StringIO()):
            # Rank 0 alone builds the vocabulary before the others go on: DeepSpeed's 10-minute default is too short.
            deepspeed.init_distributed(
                dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False, timeout=timedelta(hours=6)
            )


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """lr × (t+1)/warmup during warm-up, then lr × (total − t)/(total − warmup): the first step already learns,
    and the last runs at lr/(total − warmup)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
