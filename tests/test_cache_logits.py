"""Stage one end to end: what the cache holds, and how it behaves on reruns, crashes and several ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import cache_config, make_documents, torchrun, write_config
from transformers import AutoModelForMaskedLM, AutoTokenizer

from mdkd.cli import cli

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def shard_hashes(cache: Path) -> dict[str, str]:
    manifest = json.loads((cache / "manifest.json").read_text())
    return {s["path"]: s["sha256"] for s in manifest["shards"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory, teachers_dir):
    """One complete cache of both teachers, shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("built")
    corpus = root / "corpus"
    corpus.mkdir()
    german = make_documents("de", 20)
    (corpus / "de.txt").write_bytes(
        ("\n".join(german[:8]) + "\n\n").encode() + b"\xc3\x28 bad\n" + ("\n".join(german[8:]) + "\n").encode()
    )
    (corpus / "ru.txt").write_text("\n".join(make_documents("ru", 10)) + "\n", encoding="utf-8")
    config = write_config(root / "cache.yaml", cache_config(teachers_dir, corpus))
    result = run_cli("cache-logits", "--config", str(config), "--out", str(root / "cache"))
    assert result.exit_code == 0, result.output
    return root


def test_manifest_records_sources_teachers_and_shards(built):
    cache = built / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["schema_version"] == 3 and manifest["top_k"] == 5
    de = next(c for c in manifest["corpus"] if c["language"] == "de")
    assert (de["documents"], de["skipped_invalid_utf8_lines"], de["skipped_blank_lines"]) == (20, 1, 1)
    assert de["fingerprint"].startswith("sha256:")
    teacher = manifest["teachers"]["de_bert"]
    assert (
        teacher["special_token_ids"]["mask"]
        == AutoTokenizer.from_pretrained(cache / "tokenizers" / "de_bert").mask_token_id
    )
    assert teacher["weights"].startswith("sha256:") and teacher["languages"] == ["de"]
    # 20 German documents in parts of 6: 4 parts for each teacher serving German, 2 Russian parts.
    assert sorted(s["path"] for s in manifest["shards"]) == sorted(
        [f"de_bert/de/part-{p:05d}.parquet" for p in range(4)]
        + [f"multi_xlmr/de/part-{p:05d}.parquet" for p in range(4)]
        + [f"multi_xlmr/ru/part-{p:05d}.parquet" for p in range(2)]
    )
    for shard in manifest["shards"]:
        table = pq.read_table(cache / shard["path"])
        assert table.num_rows == shard["rows"] and (cache / shard["path"]).stat().st_size == shard["bytes"]
        assert sum(len(p) for p in table.column("positions").to_pylist()) == shard["masked_positions"]
    assert sum(s["documents"] for s in manifest["shards"] if s["teacher"] == "multi_xlmr") == 20 + 10
    assert manifest["totals"]["rows"] == sum(s["rows"] for s in manifest["shards"])
    assert manifest["identity"]["dtype"] == "float32"
    assert not (cache / ".progress").exists()


def _token_groups(cache: Path, name: str) -> dict[str, list[int]]:
    """The teacher's ids grouped by canonical token (its twins together), from the tokenizer copy in the cache."""
    from mdkd.pipeline.cache.reader import CacheReader
    from mdkd.pipeline.distill.vocab import TeacherVocabulary

    groups: dict[str, list[int]] = {}
    for token_id, token in enumerate(TeacherVocabulary.from_cache(CacheReader(cache), name).canonical):
        groups.setdefault(token, []).append(token_id)
    return groups


def _check_against_full_logits(cache: Path, teachers: dict[str, Path]) -> int:
    """Recompute every cached position from the teachers' full logits: probabilities summed over each canonical
    token's ids (twins), its smallest id standing for it; the top-k of those tokens, their log-partitions at every
    temperature, the entropy, and every tail draw's log-probability. Returns how many twin groups there were."""
    manifest = json.loads((cache / "manifest.json").read_text())
    k = manifest["top_k"]
    twin_groups = 0
    for name, folder in teachers.items():
        model = AutoModelForMaskedLM.from_pretrained(folder).eval()
        groups = list(_token_groups(cache, name).values())
        twin_groups += sum(len(ids) > 1 for ids in groups)
        representatives = torch.tensor([min(ids) for ids in groups])
        for shard in (s for s in manifest["shards"] if s["teacher"] == name):
            for row in pq.read_table(cache / shard["path"]).to_pylist():
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, row["positions"]]
                probs = torch.softmax(logits.double()[:, : manifest["teachers"][name]["vocab_size"]], dim=-1)
                grouped = torch.stack([probs[:, ids].sum(dim=1) for ids in groups], dim=1)
                expected = grouped.log().topk(k, dim=-1)
                np.testing.assert_allclose(row["topk_logprobs"], expected.values.numpy(), atol=1e-5)
                # Each cached token is distinct, and its own log-probability is the one of its rank: tokens whose
                # probabilities tie within float32's rounding (the cache's batched forward against this one-row
                # one) may come in either order, anything else must come where the recomputation puts it.
                group_of = {int(r): g for g, r in enumerate(representatives)}
                for position, ids in enumerate(row["topk_ids"]):
                    assert len(set(ids)) == k
                    own = grouped[position, [group_of[i] for i in ids]].log().numpy()
                    np.testing.assert_allclose(own, expected.values[position].numpy(), atol=1e-5)
                for column, tau in enumerate(manifest["temperatures"]):
                    partition = torch.logsumexp(grouped.log() / tau, dim=-1).numpy()
                    np.testing.assert_allclose([p[column] for p in row["log_partitions"]], partition, atol=1e-4)
                entropy = -(grouped * grouped.log()).sum(dim=-1).numpy()
                np.testing.assert_allclose(row["entropies"], entropy, atol=1e-4)
                for position, (ids, logprobs) in enumerate(zip(row["tail_ids"], row["tail_logprobs"], strict=True)):
                    expected_tail = [float(grouped[position, group_of[i]].log()) for i in ids]
                    np.testing.assert_allclose(logprobs, expected_tail, atol=1e-5)
    return twin_groups


def test_cached_topk_equals_recomputation_from_full_logits(built, teachers_dir):
    _check_against_full_logits(built / "cache", {n: teachers_dir / n for n in ("de_bert", "multi_xlmr")})


def test_twins_are_summed_before_the_top_k(tmp_path, corpus_dir):
    """A WordPiece teacher that spells `.` and `##.` (the same canonical token: the student tokenizer never
    continues a word with punctuation), with tail draws: the recomputation above, on a teacher with twins."""
    from mdkd.pipeline.distill.student_tokenizer import student_tokenizer
    from mdkd.tiny_models import build_masked_lm

    characters = sorted({ch for line in (corpus_dir / "de.txt").read_text(errors="ignore").split() for ch in line})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{ch}" for ch in characters)]
    teacher = tmp_path / "twins"
    tokenizer = student_tokenizer(tokens, lowercase=False, max_length=64)
    model = build_masked_lm("bert", tokenizer, seed=3)
    twins = [i for i, token in enumerate(tokens) if token.removeprefix("##") in ".,:;!?" and len(token) <= 3]
    with torch.no_grad():  # twins among the most probable tokens, so that their sums meet the top-k
        model.cls.predictions.bias[twins] += 4.0
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    config = {
        "corpus": [{"language": "de", "path": str(corpus_dir / "de.txt")}],
        "teachers": [{"name": "twins", "model": str(teacher), "languages": ["de"]}],
        "max_length": 32,
        "top_k": 6,
        "tail_samples": 16,
        "tail_temperature": 2.0,
        "shard_documents": 8,
    }
    result = run_cli(
        "cache-logits", "--config", str(write_config(tmp_path / "c.yaml", config)), "--out", str(tmp_path / "c")
    )
    assert result.exit_code == 0, result.output
    assert _check_against_full_logits(tmp_path / "c", {"twins": teacher}) >= 2
    cached = {
        i
        for path in (tmp_path / "c").rglob("*.parquet")
        for r in pq.read_table(path).to_pylist()
        for ids in r["topk_ids"]
        for i in ids
    }
    assert cached & set(twins), "some twin stands in the top-k"
    assert not cached & {i for i in twins if tokens[i].startswith("##")}, "represented by its smallest id alone"
    assert run_cli("cache", "verify", str(tmp_path / "c")).exit_code == 0


def test_labels_are_the_original_tokens_of_each_window(built):
    cache = built / "cache"
    tokenizer = AutoTokenizer.from_pretrained(cache / "tokenizers" / "de_bert")
    lines = (built / "corpus" / "de.txt").read_bytes().split(b"\n")
    rows = [r for p in sorted((cache / "de_bert" / "de").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert {r["copy"] for r in rows} == {0, 1}
    for row in rows:
        line_number = int(row["doc_id"].rsplit(":", 1)[1])
        text = lines[line_number - 1].decode()
        windows = tokenizer(text, max_length=32, truncation=True, return_overflowing_tokens=True, stride=0)["input_ids"]
        original = windows[row["window"]]
        assert row["labels"] == [original[p] for p in row["positions"]]
        unmasked = list(row["input_ids"])
        for position, label in zip(row["positions"], row["labels"], strict=False):
            unmasked[position] = label
        assert unmasked == original


def test_same_config_gives_the_same_bytes(built, tmp_path):
    result = run_cli("cache-logits", "--config", str(built / "cache.yaml"), "--out", str(tmp_path / "again"))
    assert result.exit_code == 0, result.output
    assert shard_hashes(tmp_path / "again") == shard_hashes(built / "cache")


def test_rerun_on_complete_cache_does_nothing(built):
    manifest = built / "cache" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    result = run_cli("cache-logits", "--config", str(built / "cache.yaml"), "--out", str(built / "cache"))
    assert result.exit_code == 0 and "nothing to do" in result.output
    assert manifest.stat().st_mtime_ns == before


def test_other_config_is_refused_unless_overwrite(built, tmp_path, teachers_dir):
    out = tmp_path / "cache"
    first = write_config(tmp_path / "a.yaml", cache_config(teachers_dir, built / "corpus"))
    assert run_cli("cache-logits", "--config", str(first), "--out", str(out)).exit_code == 0
    other = write_config(tmp_path / "b.yaml", cache_config(teachers_dir, built / "corpus", top_k=3))
    refused = run_cli("cache-logits", "--config", str(other), "--out", str(out))
    assert refused.exit_code == 2 and "different config" in refused.stderr
    replaced = run_cli("cache-logits", "--config", str(other), "--out", str(out), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "manifest.json").read_text())["top_k"] == 3


def test_moved_corpus_and_teachers_still_resume_into_the_same_cache(built, tmp_path, teachers_dir):
    import shutil

    shutil.copytree(built / "corpus", tmp_path / "corpus")
    shutil.copytree(teachers_dir, tmp_path / "teachers")
    moved = write_config(tmp_path / "moved.yaml", cache_config(tmp_path / "teachers", tmp_path / "corpus"))
    result = run_cli("cache-logits", "--config", str(moved), "--out", str(built / "cache"))
    assert result.exit_code == 0 and "nothing to do" in result.output, result.output


def test_verify_passes_then_catches_a_corrupted_shard(built, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(built / "cache", cache)
    assert run_cli("cache", "verify", str(cache)).exit_code == 0
    shard = cache / "multi_xlmr" / "ru" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_cli("cache", "verify", str(cache))
    assert result.exit_code == 1 and "multi_xlmr/ru/part-00001.parquet: sha256 differs" in result.stderr
    shard.unlink()
    assert "part-00001.parquet: missing" in run_cli("cache", "verify", str(cache)).stderr


def _damaged_copy(built: Path, tmp_path: Path, damage) -> Path:
    """A copy of the cache whose first de_bert shard is rewritten with `damage(rows)` applied, and whose
    manifest is updated to match the new file, so only the row checks can notice."""
    import shutil

    import pyarrow as pa

    from mdkd.pipeline.cache.shards import write_shard

    cache = tmp_path / "cache"
    shutil.copytree(built / "cache", cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["path"] == "de_bert/de/part-00000.parquet")
    table = pq.read_table(cache / entry["path"])
    rows = table.to_pylist()
    damage(rows)
    stats = write_shard(cache, entry["path"], pa.Table.from_pylist(rows, schema=table.schema))
    entry.update(bytes=stats.bytes, sha256=stats.sha256)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return cache


def test_verify_catches_rows_that_do_not_add_up(built, tmp_path):
    def drop_a_label(rows):
        rows[1]["labels"] = rows[1]["labels"][:-1]

    result = run_cli("cache", "verify", str(_damaged_copy(built, tmp_path, drop_a_label)))
    assert result.exit_code == 1 and "labels and positions differ in length" in result.stderr


def test_verify_catches_log_probabilities_out_of_order(built, tmp_path):
    def reverse_top_k(rows):
        rows[0]["topk_logprobs"][0] = list(reversed(rows[0]["topk_logprobs"][0]))

    result = run_cli("cache", "verify", str(_damaged_copy(built, tmp_path, reverse_top_k)))
    assert result.exit_code == 1 and "descending order" in result.stderr


def test_inspect_reports_every_teacher_and_language(built):
    result = run_cli("cache", "inspect", str(built / "cache"), "--json")
    assert result.exit_code == 0
    *rows, shares = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["teacher"], r["language"]) for r in rows] == [
        ("de_bert", "de"),
        ("multi_xlmr", "de"),
        ("multi_xlmr", "ru"),
    ]
    manifest = json.loads((built / "cache" / "manifest.json").read_text())
    for row in rows:
        assert 0 < row["mean_top1_probability"] <= row["mean_topk_mass"] <= 1
        assert row["mean_topk_mass_tau1"] == pytest.approx(row["mean_topk_mass"], rel=1e-4)
        # Tempering at tau = 2 flattens the distribution, so the top-k keeps less of it.
        assert 0 < row["mean_topk_mass_tau2"] < row["mean_topk_mass_tau1"]
        # The true entropy, of the whole vocabulary: at most log V, and above what the top-k alone could hold.
        assert 0 <= row["mean_entropy"] <= np.log(manifest["teachers"][row["teacher"]]["vocab_size"]) + 1e-4
        assert row["bytes_per_position"] > 0
    assert set(shares["token_shares"]) == {"de_bert", "multi_xlmr"}
    # The random tiny teachers' top-5 holds a few percent of their mass: inspect says so on stderr.
    assert result.stderr.count("warning: the top-5 of") == 3


def test_float16_logprobs_halve_that_column(built, tmp_path, teachers_dir):
    config = write_config(tmp_path / "c.yaml", cache_config(teachers_dir, built / "corpus", logprobs_dtype="float16"))
    assert run_cli("cache-logits", "--config", str(config), "--out", str(tmp_path / "c")).exit_code == 0
    table = pq.read_table(tmp_path / "c" / "de_bert" / "de" / "part-00000.parquet")
    assert str(table.schema.field("topk_logprobs").type) == "list<element: list<element: halffloat>>"
    reference = pq.read_table(built / "cache" / "de_bert" / "de" / "part-00000.parquet")
    np.testing.assert_allclose(
        np.concatenate([np.array(x, dtype=np.float32) for x in table.column("topk_logprobs").to_pylist()]),
        np.concatenate([np.array(x) for x in reference.column("topk_logprobs").to_pylist()]),
        rtol=2e-3,
    )


def _big_config(tmp_path: Path, teachers_dir: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "de.txt").write_text("\n".join(make_documents("de", 300, seed=1)) + "\n", encoding="utf-8")
    (corpus / "ru.txt").write_text("\n".join(make_documents("ru", 200, seed=1)) + "\n", encoding="utf-8")
    return write_config(tmp_path / "big.yaml", cache_config(teachers_dir, corpus, shard_documents=3))


def session_processes(session: int) -> list[str]:
    """The command lines of the live processes in a session (Linux's /proc; zombies are dead already)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session and fields[0] != "Z":
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except (OSError, IndexError, ValueError):
            continue  # ended while being read
    return found


def test_kill_minus_nine_then_rerun_equals_an_uninterrupted_run(tmp_path, teachers_dir):
    config = _big_config(tmp_path, teachers_dir)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    command = [sys.executable, "-m", "mdkd", "cache-logits", "--config", str(config), "--out"]
    subprocess.run(command + [str(reference)], check=True, env=ENV, capture_output=True)
    for kill_after_markers in (3, 60):
        process = subprocess.Popen(
            command + [str(resumed)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its workers and their fork server share its session id
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if len(list((resumed / ".progress").rglob("*.json"))) >= kill_after_markers:
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not json.loads((resumed / "manifest.json").read_text())["complete"], "the kill must land mid-run"
        # Nothing of the killed stage lives on: its worker processes and their fork server end with it.
        deadline = time.monotonic() + 30
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not session_processes(process.pid), session_processes(process.pid)
    finished = subprocess.run(command + [str(resumed)], env=ENV, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert shard_hashes(resumed) == shard_hashes(reference)
    for path in shard_hashes(reference):
        assert (resumed / path).read_bytes() == (reference / path).read_bytes()
    assert not list(resumed.rglob("*.tmp"))


def test_two_ranks_write_one_manifest_equal_to_one_rank(tmp_path, teachers_dir):
    config = _big_config(tmp_path, teachers_dir)
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "mdkd", "cache-logits", "--config", str(config), "--out", str(single)],
        check=True,
        env=ENV,
        capture_output=True,
    )
    run = subprocess.run(
        torchrun("-m", "mdkd", "cache-logits", "--config", str(config), "--out", str(double)),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert shard_hashes(double) == shard_hashes(single)
    assert run.stdout.count("cache complete") == 1, "console output comes from rank 0 only"
    logs = sorted(p.name for p in (double / "logs").iterdir())
    assert logs == ["cache-logits.rank0.jsonl", "cache-logits.rank1.jsonl"]
    parts = {
        json.loads(line)["part"] % 2 for line in (double / "logs" / "cache-logits.rank1.jsonl").read_text().splitlines()
    }
    assert parts == {1}, "rank 1 takes the odd parts"


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_draws_follow_the_tempered_distribution_outside_the_top_k(temperature):
    """Stage one's inverse-CDF draws: over many uniforms, each token's share of the draws is its tempered
    probability renormalised outside the top-k (within 5 binomial standard errors); top-k tokens are never drawn."""
    from mdkd.pipeline.teacher_pass.teachers import _draw_outside

    generator = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(1, 40, generator=generator) * 2, dim=-1)
    top = logprobs.topk(5, dim=-1).indices
    draws = 200_000
    drawn = _draw_outside(logprobs, top, torch.rand(1, draws, generator=generator), temperature)
    counts = torch.bincount(drawn[0], minlength=40).double()
    tempered = torch.softmax(logprobs[0].double() / temperature, dim=-1)
    tempered[top[0]] = 0.0
    expected = tempered / tempered.sum()
    assert counts[top[0]].sum() == 0
    standard_error = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= 5 * standard_error + 1e-12).all()
