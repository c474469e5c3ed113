#!/usr/bin/env bash
# Both benchmarks at BERT-base shape in bf16 on one GPU, each printing one JSON line, in about 8 minutes.
#
# A bare GPU machine (docs/performance.md, "On a GPU") has torch, transformers, tokenizers, pyarrow and the rest,
# but not deepspeed, pydantic (and its three small needs) or hjson. They travel as wheels in .whl/ (ignored by
# git), fetched once on a machine with pip and the internet:
#
#     bench/gpu.sh wheels            # here: downloads them into .whl/ for CPython 3.12 on x86-64 Linux
#     bench/gpu.sh                   # there, from the repository root, with .whl carried along
#
# What it runs (each step's stdout's last line is its JSON; everything is also kept under $OUT when set):
#   1. bench/cache_logits.py --preset base --device cuda --dtype bf16 --skip-rss: stage one end to end / bare
#      forward, tokens/s (its own figures), and the bare forward's MFU computed here from them.
#   2. bench/train.py --sweep --preset base --precision bf16 --vocabularies 120000,250000: stage two's loss and
#      head at BERT-base (hidden 768, 12 layers), tokens/s, MFU against PEAK_TFLOPS, step / plain MLM step,
#      the loss's extra peak memory / one [positions x vocabulary] fp32 tensor (torch.cuda's counters).
set -euo pipefail
cd "$(dirname "$0")/.."

PEAK_TFLOPS="${PEAK_TFLOPS:-989}"  # H100 / H200 SXM dense bf16; a measured 8192^3 product reached ~790 there
WHEELS=(deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5)

if [[ "${1:-}" == "wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # deepspeed ships only a source distribution: build its wheel here (pure Python until its ops are JIT-built).
    python3 -m pip wheel --no-deps -w .whl "${WHEELS[0]}"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]:1}"
    ls -l .whl
    exit 0
fi

out="${OUT:-/tmp/mdkd-gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, deepspeed, pydantic, mdkd; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"

# 1. Stage one (about 3 minutes at the base preset with --skip-rss).
timeout 270 python3 bench/cache_logits.py --preset base --device cuda --dtype bf16 --skip-rss \
    > "$out/cache_logits.out" 2> "$out/cache_logits.err" || echo "cache_logits.py failed or timed out" >&2
tail -n 1 "$out/cache_logits.out" | python3 -c "
import json, sys
line = sys.stdin.read().strip()
figures = json.loads(line) if line.startswith('{') else {}
# MFU of the bare forward: 2 FLOPs per encoder weight per token (the head, at masked positions only, left out).
bare = (figures.get('bare_forward') or {}).get('tokens_per_s')
encoder = figures.get('parameters', 0) - figures.get('vocab', 0) * figures.get('hidden', 0)
mfu = None if not bare else 2 * encoder * bare / ($PEAK_TFLOPS * 1e12)
print(json.dumps({'benchmark': 'cache_logits', 'peak_tflops': $PEAK_TFLOPS, 'bare_forward_mfu': mfu, **figures}))"

# 2. Stage two's loss and head (about 3 minutes).
timeout 240 python3 bench/train.py --sweep --preset base --precision bf16 --rows 64 \
    --vocabularies 120000,250000 --peak-tflops "$PEAK_TFLOPS" \
    > "$out/train.out" 2> "$out/train.err" || echo "train.py --sweep failed or timed out" >&2
tail -n 1 "$out/train.out" | python3 -c "
import json, sys
line = sys.stdin.read().strip()
print(json.dumps({'benchmark': 'train', **(json.loads(line) if line.startswith('{') else {})}))"
