"""Stage two's golden values: the first losses of a tiny fixed-seed run, pinned at 1e-5.

The other stage-two tests compare runs with each other (resumed against uninterrupted, 2 ranks against 1, ZeRO
stages against stage 0), so a change to sampling, masking, the vocabulary or the loss moves both sides and still
passes. These values move with any such change: when one is intended, say why in the commit that re-pins them.

Everything here is deterministic across processes: the teacher's WordPiece vocabulary is written out, not trained
(`tokenizers` training is not reproducible across processes, huggingface/tokenizers#1794), its weights come from
a fixed seed, and the corpus is the example's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import EXAMPLE_CORPUS, train_config, write_config

from mdkd.cli import cli
from mdkd.pipeline.distill.student_tokenizer import student_tokenizer
from mdkd.tiny_models import build_masked_lm

# Steps 1 to 4 of each run: (loss, kd_loss, mlm_loss). Re-pinned when stage one began to sum a teacher's twins
# (`.` and `##.`) before its top-k: the tempered log-partitions and the KD terms moved, the MLM loss did not.
# With one teacher the student vocabulary is that teacher's, so its support is everything and `support` equals
# `rest` here (tests/test_kd_dense_reference.py tells them apart); the sampled tail adds the rest's inside.
GOLDEN = {
    "rest": [
        (3.9637113, 2.4562247, 5.4711979),
        (3.8097159, 2.3013102, 5.3181216),
        (3.7684230, 2.2128972, 5.3239488),
        (3.7201412, 2.1264792, 5.3138032),
    ],
    "renormalize": [
        (9.7837685, 14.0963390, 5.4711979),
        (9.3869224, 13.4425053, 5.3313393),
        (9.2490804, 13.1278484, 5.3703124),
        (9.1234953, 12.9011215, 5.3458691),
    ],
    "support": [
        (3.9637113, 2.4562247, 5.4711979),
        (3.8097159, 2.3013102, 5.3181216),
        (3.7684230, 2.2128972, 5.3239488),
        (3.7201412, 2.1264792, 5.3138032),
    ],
    "support+sampled": [
        (4.4457929, 3.4203878, 5.4711979),
        (4.5122091, 3.7045332, 5.3198851),
        (4.4381367, 3.5248120, 5.3514615),
        (4.2381787, 3.1254484, 5.3509090),
    ],
}


@pytest.fixture(scope="module")
def golden_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    lines = [line for line in (EXAMPLE_CORPUS / "de.txt").read_text(encoding="utf-8").splitlines() if line]
    words = Counter(word for line in lines for word in line.replace(".", " . ").replace(",", " , ").split())
    characters = sorted({ch for line in lines for ch in line if not ch.isspace()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{ch}" for ch in characters)]
    tokens += [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if w not in tokens][:150]
    tokenizer = student_tokenizer(tokens, lowercase=False, max_length=64)
    teacher = build_masked_lm("bert", tokenizer, seed=7)
    # A random head is nearly uniform, which would leave the KD loss near 0 and the golden values blind to it. A
    # Zipf-like output bias makes a teacher that prefers some tokens, as a trained one does.
    with torch.no_grad():
        teacher.cls.predictions.bias.copy_(-2.0 * torch.log1p(torch.arange(len(tokens), dtype=torch.float32) % 97))
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    config = {
        "corpus": [{"language": "de", "path": str(EXAMPLE_CORPUS / "de.txt")}],
        "teachers": [{"name": "de_bert", "model": str(root / "teacher"), "languages": ["de"]}],
        "masking": {"probability": 0.15, "mask": 0.8, "random": 0.1, "keep": 0.1, "seed": 0, "copies": 4},
        "max_length": 32,
        "top_k": 8,
        "tail_samples": 8,
        "tail_temperature": 1.0,  # pinned: the draws are reweighted to the loss's tau 2
        "shard_documents": 4,
        "dtype": "fp32",
        "device": "cpu",
    }
    result = CliRunner().invoke(
        cli, ["cache-logits", "--config", str(write_config(root / "cache.yaml", config)), "--out", str(root / "cache")]
    )
    assert result.exit_code == 0, result.output
    return root / "cache"


@pytest.mark.parametrize("variant", sorted(GOLDEN))
def test_the_first_losses_of_a_fixed_seed_run(golden_cache, tmp_path, variant):
    missing_mass, _, tail = variant.partition("+")
    config = train_config(
        loss={
            "missing_mass": missing_mass,
            "tail": tail or "none",
            "alpha": {"schedule": "constant", "start": 0.5},
        },
        train={"steps": 4, "checkpoint_every": 4, "eval_fraction": 0.1},
    )
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--config",
            str(write_config(tmp_path / "c.yaml", config)),
            "--cache",
            str(golden_cache),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    found = [(m["loss"], m["kd_loss"], m["mlm_loss"]) for m in lines if m["split"] == "train"]
    assert len(found) == 4
    for step, (got, pinned) in enumerate(zip(found, GOLDEN[variant], strict=False), start=1):
        assert got == pytest.approx(pinned, abs=1e-5), (step, got)
