"""Stage one's worker processes: any number of them writes the same bytes, and they change nothing else."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import cache_config, make_documents, write_config
from transformers import AutoTokenizer

from mdkd.cli import cli
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.teacher_pass import workers as worker_module
from mdkd.pipeline.teacher_pass.config import MaskingConfig, load_cache_config
from mdkd.pipeline.teacher_pass.corpus import Document
from mdkd.pipeline.teacher_pass.masking import Masker, window_seed
from mdkd.pipeline.teacher_pass.windows import TailSampling, length_batches, padded_inputs, plan_batches, prepare_unit


def _run(config, out):
    return CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", str(out)])


def _shard_hashes(cache) -> dict[str, str]:
    return {s["path"]: s["sha256"] for s in json.loads((cache / "manifest.json").read_text())["shards"]}


def test_zero_one_and_two_workers_write_the_same_shards(tmp_path, teachers_dir, corpus_dir):
    hashes = {}
    for workers in (0, 1, 2):
        config = write_config(tmp_path / f"w{workers}.yaml", cache_config(teachers_dir, corpus_dir, workers=workers))
        result = _run(config, tmp_path / f"w{workers}")
        assert result.exit_code == 0, result.output
        hashes[workers] = _shard_hashes(tmp_path / f"w{workers}")
    assert len(hashes[0]) == 4 + 4 + 3  # de: 24 documents in parts of 6, for two teachers; ru: 16
    assert hashes[0] == hashes[1] == hashes[2]


def test_workers_are_not_part_of_the_identity_and_a_cache_resumes_with_another_count(
    tmp_path, teachers_dir, corpus_dir
):
    one = write_config(tmp_path / "a.yaml", cache_config(teachers_dir, corpus_dir, workers=0))
    other = write_config(tmp_path / "b.yaml", cache_config(teachers_dir, corpus_dir, workers=2))
    unset = write_config(tmp_path / "c.yaml", cache_config(teachers_dir, corpus_dir))
    hashes = {load_cache_config(path).content_hash() for path in (one, other, unset)}
    assert len(hashes) == 1
    assert _run(one, tmp_path / "cache").exit_code == 0
    manifest = tmp_path / "cache" / "manifest.json"
    # An unfinished cache (a unit lost) is finished by a run with other workers, to the same bytes.
    before = _shard_hashes(tmp_path / "cache")
    record = json.loads(manifest.read_text())
    lost = record["shards"][3]
    (tmp_path / "cache" / lost["path"]).unlink()
    progress = tmp_path / "cache" / ".progress"
    for shard in record["shards"]:
        if shard["path"] != lost["path"]:
            marker = progress / shard["teacher"] / shard["language"] / f"part-{shard['part']:05d}.json"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(shard))
    record.update(complete=False, shards=[], totals=None)
    manifest.write_text(json.dumps(record))
    resumed = _run(other, tmp_path / "cache")
    assert resumed.exit_code == 0, resumed.output
    assert _shard_hashes(tmp_path / "cache") == before
    again = _run(unset, tmp_path / "cache")
    assert again.exit_code == 0 and "nothing to do" in again.output


class _RefusingTokenizer:
    """Stands in for a teacher's tokenizer in the workers (which import this module to unpickle it)."""

    def __call__(self, *args, **kwargs):
        raise UserError("this block cannot be prepared (a test)")


def test_an_error_in_a_worker_is_one_line(tmp_path, teachers_dir, corpus_dir, monkeypatch):
    from mdkd.stages import cache_logits

    def refusing_preparation(tokenizer, *args):
        return worker_module.UnitPreparation(_RefusingTokenizer(), *args)

    monkeypatch.setattr(cache_logits, "UnitPreparation", refusing_preparation)
    config = write_config(tmp_path / "c.yaml", cache_config(teachers_dir, corpus_dir, workers=2))
    result = _run(config, tmp_path / "cache")
    assert result.exit_code == 2
    assert result.stderr == "error: this block cannot be prepared (a test)\n"


@pytest.mark.parametrize("batch_size", [None, 3])
def test_planned_batches_are_padded_inputs_of_length_batches(teachers_dir, batch_size):
    tokenizer = AutoTokenizer.from_pretrained(teachers_dir / "multi_xlmr")
    documents = [Document(f"de:x:{i}", text) for i, text in enumerate(make_documents("de", 12))]
    masker = Masker(MaskingConfig(copies=2), tokenizer.mask_token_id, set(tokenizer.all_special_ids), len(tokenizer))
    unit = prepare_unit(documents, tokenizer, masker, 16, copies=2)
    tail = TailSampling(8, 2.0, 0)
    uniforms = tail.uniforms(unit.rows)
    rows = list(unit.rows)
    starts = np.cumsum([0] + [len(r.positions) for r in rows])
    planned = plan_batches(unit.rows, tokenizer.pad_token_id, 128, batch_size, tail)
    expected = length_batches([len(r.input_ids) for r in rows], 128, batch_size)
    assert len(planned) == len(expected)
    for batch, members in zip(planned, expected, strict=True):
        tensors = batch.tensors(pin=False)
        for got, want in zip(
            (tensors.input_ids, tensors.attention_mask, tensors.rows, tensors.cols),
            padded_inputs([rows[i] for i in members], tokenizer.pad_token_id),
            strict=True,
        ):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert np.array_equal(batch.targets, np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members]))
        assert np.array_equal(batch.tail_uniforms, uniforms[batch.targets])
    # Row by row, the uniforms are each row's own generator's.
    for row, first, end in zip(rows, starts, starts[1:], strict=False):
        generator = np.random.default_rng([window_seed(0, row.doc_id, row.window, row.copy), 7])
        own = generator.random((end - first, 8), dtype=np.float32)
        assert np.array_equal(uniforms[first:end], own)
