"""Trust: nothing of the user's is deleted, nothing untrusted is executed, and every command checks what it reads.

Each test names the case it covers; every refusal is one line on stderr, exit status 2, no traceback, and the
test looks at what is on disk afterwards.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import cache_config, metrics, train, train_config, unfinished_copy, write_config

from mdkd.cli import cli
from mdkd.pipeline.distill import checkpoints


def one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


# ---------------------------------------------------------------- checkpoints: nothing unpickled that mdkd never wrote


class _RunsCode:
    """A pickle that runs code when loaded the way DeepSpeed loads checkpoints (weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def finished_run(training_cache, tmp_path_factory) -> tuple[Path, dict]:
    """An 8-step run with checkpoints at steps 4 and 8, and its config."""
    root = tmp_path_factory.mktemp("finished")
    config = train_config(train={"steps": 8, "checkpoint_every": 4})
    assert train(root, training_cache, config).exit_code == 0
    return root / "run", config


def test_every_checkpoint_carries_a_record_of_its_files(finished_run):
    run, _ = finished_run
    for step in (4, 8):
        folder = run / "checkpoints" / f"step-{step:07d}"
        record = json.loads((folder / checkpoints.RECORD).read_text())
        assert record["step"] == step
        assert set(record["files"]) == {p.name for p in folder.iterdir() if p.name != checkpoints.RECORD}


def test_a_crafted_checkpoint_is_never_unpickled(finished_run, training_cache, tmp_path):
    """Case 2: a pickle that runs code, given to --resume PATH, first without mdkd's record, then with a record
    forged to match it: neither run loads it, and its code never runs."""
    run, config = finished_run
    crashed = unfinished_copy(run, tmp_path / "crashed", died_after=6, last_checkpoint=4)
    crafted = tmp_path / "crafted" / "step-0000004"
    crafted.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch_file = crafted / "mp_rank_00_model_states.pt"
    torch_file.write_bytes(pickle.dumps({"module": _RunsCode(marker)}, protocol=2))

    result = train(tmp_path, training_cache, config, "crashed", "--resume", str(crafted))
    one_line_error(result, f"checkpoint {crafted} has no readable {checkpoints.RECORD}")
    assert not marker.exists()

    checkpoints.write_record(crafted, json.loads((run / "run.json").read_text())["identity"]["config_hash"], 4)
    result = train(tmp_path, training_cache, config, "crashed", "--resume", str(crafted))
    one_line_error(result, "holds more than tensors and plain values")
    assert not marker.exists(), "the crafted pickle ran its code"
    assert not (crashed / "student").exists()


def test_a_checkpoint_changed_since_it_was_written_is_refused(finished_run, training_cache, tmp_path):
    run, config = finished_run
    crashed = unfinished_copy(run, tmp_path / "crashed", died_after=6, last_checkpoint=4)
    state = crashed / "checkpoints" / "step-0000004" / "mp_rank_00_model_states.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped, the size unchanged
    state.write_bytes(bytes(data))
    result = train(tmp_path, training_cache, config, "crashed", "--resume", str(state.parent))
    one_line_error(result, "mp_rank_00_model_states.pt differs from what mdkd recorded")


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(finished_run, training_cache, tmp_path):
    """A save cut short (no record) is the newest checkpoint: --resume auto takes the one before, says so, and
    reproduces the uninterrupted run's steps from there."""
    run, config = finished_run
    crashed = unfinished_copy(run, tmp_path / "crashed", died_after=6, last_checkpoint=4)
    shutil.copytree(crashed / "checkpoints" / "step-0000004", crashed / "checkpoints" / "step-0000006")
    (crashed / "checkpoints" / "step-0000006" / checkpoints.RECORD).unlink()
    result = train(tmp_path, training_cache, config, "crashed", "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert "passed over: checkpoint" in result.stderr and "step-0000006" in result.stderr
    again, full = metrics(crashed), metrics(run)
    assert [m["step"] for m in again] == list(range(1, 9))
    for a, b in zip(full[4:], again[4:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_resume_at_an_empty_checkpoint_folder(finished_run, training_cache, tmp_path):
    """Case 8: --resume at a folder with nothing in it."""
    run, config = finished_run
    unfinished_copy(run, tmp_path / "crashed", died_after=6, last_checkpoint=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = train(tmp_path, training_cache, config, "crashed", "--resume", str(empty))
    one_line_error(result, f"checkpoint {empty} has no readable")


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_checkpoints_resume_through_the_weights_only_loader(training_cache, tmp_path, zero_stage):
    """ZeRO's optimizer states pickle a few DeepSpeed types: they load under weights_only, and the resumed run
    reproduces the uninterrupted one."""
    config = train_config(zero_stage=zero_stage, train={"steps": 4, "checkpoint_every": 2})
    assert train(tmp_path, training_cache, config).exit_code == 0
    run = tmp_path / "run"
    crashed = unfinished_copy(run, tmp_path / "crashed", died_after=4, last_checkpoint=2)
    result = train(tmp_path, training_cache, config, "crashed", "--resume", "auto")
    assert result.exit_code == 0, result.output
    for a, b in zip(metrics(run)[2:], metrics(crashed)[2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert os.listdir(crashed / "student")


# ---------------------------------------------------------------- output folders: nothing of the user's is deleted


def _users_project(folder: Path, record_name: str, record: str) -> Path:
    """Case 1: a folder of the user's that happens to hold a file named like mdkd's record."""
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.js").write_text("code")
    (folder / record_name).write_text(record)
    return folder


@pytest.mark.parametrize("record", ['{"manifest_version": 3}', "not json at all", '{"identity": "x", "complete": 1}'])
def test_overwrite_refuses_a_cache_folder_mdkd_did_not_write(tmp_path, training_cache, record):
    folder = _users_project(tmp_path / "x", "manifest.json", record)
    config = training_cache.parent / "cache.yaml"
    result = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", str(folder), "--overwrite"])
    one_line_error(result, "holds a manifest.json that is not an mdkd cache record")
    assert (folder / "src" / "main.js").read_text() == "code"
    assert (folder / "manifest.json").read_text() == record


def test_overwrite_refuses_a_run_folder_mdkd_did_not_write(tmp_path, training_cache):
    folder = _users_project(tmp_path / "run", "run.json", '{"identity": {"config_hash": "x"}, "complete": false}')
    result = train(tmp_path, training_cache, train_config(), "run", "--overwrite")
    one_line_error(result, "holds a run.json that is not an mdkd run record")
    assert (folder / "src" / "main.js").read_text() == "code"


def test_overwrite_through_a_symbolic_link_replaces_the_folder_it_points_to(tmp_path, training_cache):
    """Case 8: --overwrite on a symlinked --out: the link stays a link, the run behind it is replaced."""
    real = tmp_path / "real"
    assert (
        train(tmp_path, training_cache, train_config(train={"steps": 2, "checkpoint_every": 2}), "real").exit_code == 0
    )
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    result = train(
        tmp_path, training_cache, train_config(train={"steps": 4, "checkpoint_every": 4}), "link", "--overwrite"
    )
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and [m["step"] for m in metrics(real)] == [1, 2, 3, 4]


def test_a_second_writer_on_the_same_folder_is_refused_at_once(tmp_path, training_cache):
    """Case 9: another process holds the folder (a running cache-logits): the second neither runs nor deletes the
    first one's temporary files."""
    import subprocess
    import sys

    folder = tmp_path / "cache"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from mdkd.pipeline.output_folder import lock_folder; "
            f"lock_folder(Path({str(folder)!r})); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (folder / ".part-00000.parquet.123.tmp").write_bytes(b"being written")
        config = training_cache.parent / "cache.yaml"
        result = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", str(folder)])
        line = one_line_error(result, f"{folder} is being written by another mdkd")
        assert f"pid {holder.pid}" in line
        assert (folder / ".part-00000.parquet.123.tmp").read_bytes() == b"being written"
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- what a command reads is checked first


def _cache_copy(training_cache: Path, into: Path) -> Path:
    shutil.copytree(training_cache, into)
    return into


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def _evaluate(model: Path, cache: Path):
    return CliRunner().invoke(
        cli,
        ["eval", str(model), "--cache", str(cache), "--eval-fraction", "0.3", "--out", str(cache.parent / "e.json")],
    )


def test_a_tokenizer_copy_changed_after_caching_is_found(training_cache, teachers_dir, tmp_path):
    """Case 3: two token ids swapped in a teacher's tokenizer copy: verify reports it, train and eval refuse it
    before anything is written; with the file deleted, the same."""
    cache = _cache_copy(training_cache, tmp_path / "cache")
    tokenizer_file = cache / "tokenizers" / "de_bert" / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_file.write_text(json.dumps(tokenizer))

    verified = CliRunner().invoke(cli, ["cache", "verify", str(cache)])
    assert verified.exit_code == 1 and "tokenizer copy of teacher de_bert differs from the manifest's hash" in (
        verified.stderr
    )
    one_line_error(train(tmp_path, cache, train_config()), "tokenizer copy of teacher de_bert differs")
    assert not (tmp_path / "run").exists(), "nothing is claimed before the inputs are checked"
    one_line_error(_evaluate(teachers_dir / "de_bert", cache), "tokenizer copy of teacher de_bert differs")
    assert not (tmp_path / "e.json").exists()

    tokenizer_file.unlink()
    one_line_error(train(tmp_path, cache, train_config()), "tokenizer copy of teacher de_bert differs")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["truncated", "another shard"])
def test_eval_and_inspect_refuse_a_damaged_shard(training_cache, teachers_dir, tmp_path, damage):
    """Case 4: a truncated shard, or one replaced by another valid shard of the cache (which made eval drop a
    language without a word): one line from eval and from inspect."""
    cache = _cache_copy(training_cache, tmp_path / "cache")
    shards = _manifest(cache)["shards"]
    target = cache / shards[0]["path"]
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    else:
        shutil.copyfile(cache / shards[-1]["path"], target)
    one_line_error(_evaluate(teachers_dir / "de_bert", cache), f"{shards[0]['path']}:")
    one_line_error(CliRunner().invoke(cli, ["cache", "inspect", str(cache)]), f"{shards[0]['path']}:")


@pytest.mark.parametrize("where", ["shard", "tokenizer"])
@pytest.mark.parametrize("path", ["/etc/passwd", "../../x", "de_bert/../../../x"])
def test_manifest_paths_may_not_leave_the_cache(training_cache, teachers_dir, tmp_path, where, path):
    """Case 5: verify, train, eval and inspect all refuse a manifest that points outside the cache folder."""
    cache = _cache_copy(training_cache, tmp_path / "cache")
    manifest = _manifest(cache)
    if where == "shard":
        manifest["shards"][0]["path"] = path
    else:
        manifest["teachers"]["de_bert"]["tokenizer_dir"] = path
    (cache / "manifest.json").write_text(json.dumps(manifest))
    for result in (
        CliRunner().invoke(cli, ["cache", "verify", str(cache)]),
        train(tmp_path, cache, train_config()),
        _evaluate(teachers_dir / "de_bert", cache),
        CliRunner().invoke(cli, ["cache", "inspect", str(cache)]),
    ):
        one_line_error(result, "is not a path inside the cache folder")


def test_a_shard_that_is_a_link_out_of_the_cache_is_refused(training_cache, tmp_path):
    cache = _cache_copy(training_cache, tmp_path / "cache")
    shard = cache / _manifest(cache)["shards"][0]["path"]
    outside = tmp_path / "outside.parquet"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    one_line_error(train(tmp_path, cache, train_config()), "lies outside the cache")


# ---------------------------------------------------------------- hints that name a command that works


def _shard_hashes(cache: Path) -> dict[str, str]:
    return {shard["path"]: shard["sha256"] for shard in _manifest(cache)["shards"]}


def test_cache_logits_repairs_a_complete_cache_whose_shards_fail_verification(training_cache, tmp_path):
    """Case 10: train's hint for a damaged cache is to rerun cache-logits, which redoes the damaged units alone
    (the same bytes as before) instead of answering "already complete"; a damaged tokenizer copy is rewritten."""
    cache = _cache_copy(training_cache, tmp_path / "cache")
    before, manifest_before = _shard_hashes(cache), (cache / "manifest.json").read_text()
    shards = list(before)
    (cache / shards[1]).write_bytes(b"damaged")
    (cache / shards[-1]).unlink()
    (cache / "tokenizers" / "multi_xlmr" / "tokenizer.json").write_text("{}")
    hint = one_line_error(train(tmp_path, cache, train_config()), "rerun `mdkd cache-logits` with its config")
    assert f"--out {cache}" in hint
    untouched = {path: (cache / path).stat().st_mtime_ns for path in shards[2:-1]}

    config = training_cache.parent / "cache.yaml"
    result = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", str(cache)])
    assert result.exit_code == 0, result.output
    assert "repairing 2 shard(s) and 1 tokenizer copy(ies)" in result.output
    assert _shard_hashes(cache) == before and (cache / "manifest.json").read_text() == manifest_before
    assert all((cache / path).stat().st_mtime_ns == mtime for path, mtime in untouched.items()), "intact units rerun"
    assert not (cache / ".progress").exists()
    assert CliRunner().invoke(cli, ["cache", "verify", str(cache)]).exit_code == 0


def test_a_damaged_manifest_is_not_replaced_and_the_hint_says_what_to_do(training_cache, tmp_path):
    cache = _cache_copy(training_cache, tmp_path / "cache")
    (cache / "manifest.json").write_text("{ torn")
    line = one_line_error(train(tmp_path, cache, train_config()), "cannot read")
    assert "move the cache folder away, or delete it, and rerun `mdkd cache-logits`" in line
    config = training_cache.parent / "cache.yaml"
    result = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", str(cache), "--overwrite"])
    one_line_error(result, "not an mdkd cache record")
    assert (cache / "manifest.json").read_text() == "{ torn"


def test_a_schema_version_of_the_wrong_type_is_named_as_such(training_cache, tmp_path):
    cache = _cache_copy(training_cache, tmp_path / "cache")
    manifest = _manifest(cache)
    (cache / "manifest.json").write_text(json.dumps({**manifest, "schema_version": "2"}))
    line = one_line_error(CliRunner().invoke(cli, ["cache", "verify", str(cache)]), "schema version '2' (str)")
    assert "reads the integers 1, 2" in line


def test_an_empty_train_config_is_not_a_run(training_cache, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    result = CliRunner().invoke(
        cli, ["train", "--config", str(tmp_path / "empty.yaml"), "--cache", str(training_cache), "--out", "x"]
    )
    one_line_error(result, "train: required key is missing")
    (tmp_path / "nosteps.yaml").write_text("train: {micro_batch_size: 4}\n")
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nosteps.yaml")])
    assert result.exit_code == 2 and "train.steps: required key is missing" in result.stderr


# ---------------------------------------------------------------- configs: what cannot be right is refused at once


def _cache_logits(tmp_path: Path, config: dict, out: str = "out"):
    path = write_config(tmp_path / f"{out}.yaml", config)
    return CliRunner().invoke(cli, ["cache-logits", "--config", str(path), "--out", str(tmp_path / out)])


def test_top_k_is_checked_against_the_tokenizer_not_a_padded_head(tmp_path, teachers_dir, corpus_dir):
    """Case 6: a model head wider than its tokenizer (420 rows, 400 tokens): a top_k between them was accepted,
    then failed in scoring after --out was claimed."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    padded = tmp_path / "padded"
    tokenizer = AutoTokenizer.from_pretrained(teachers_dir / "multi_xlmr")
    model = AutoModelForMaskedLM.from_pretrained(teachers_dir / "multi_xlmr")
    model.resize_token_embeddings(len(tokenizer) + 20)
    model.save_pretrained(padded)
    tokenizer.save_pretrained(padded)
    config = cache_config(teachers_dir, corpus_dir, top_k=len(tokenizer) + 10)
    config["teachers"] = [{"name": "padded", "model": str(padded), "languages": ["de", "ru"]}]
    one_line_error(_cache_logits(tmp_path, config), f"larger than its vocabulary of {len(tokenizer)}")
    assert not (tmp_path / "out").exists()


def test_a_language_listed_twice_by_a_teacher(tmp_path, teachers_dir, corpus_dir):
    """Case 7: `languages: [de, de]` computed every unit twice and listed its shards twice."""
    config = cache_config(teachers_dir, corpus_dir)
    config["teachers"][1]["languages"] = ["de", "ru", "de"]
    one_line_error(_cache_logits(tmp_path, config), "languages ['de'] are listed twice")


def test_a_source_listed_twice(tmp_path, teachers_dir, corpus_dir):
    config = cache_config(teachers_dir, corpus_dir)
    config["corpus"].append(dict(config["corpus"][0]))
    one_line_error(_cache_logits(tmp_path, config), "is listed twice for language 'de'")


def test_two_sources_whose_doc_ids_collide(tmp_path, teachers_dir, corpus_dir):
    """`a/de.txt` and `b/de.txt` both name their documents `de:de.txt:<line>`: the held-out rule could not keep
    them apart."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copyfile(corpus_dir / "de.txt", tmp_path / folder / "de.txt")
    config = cache_config(teachers_dir, corpus_dir)
    config["corpus"][0] = {"language": "de", "path": str(tmp_path / "a" / "de.txt")}
    config["corpus"].append({"language": "de", "path": str(tmp_path / "b" / "de.txt")})
    one_line_error(_cache_logits(tmp_path, config), "both name documents 'de.txt' in language 'de'")


def test_a_teacher_path_that_is_a_file(tmp_path, teachers_dir, corpus_dir):
    """Case 10: was "Repo id must be in the form ..."."""
    config = cache_config(teachers_dir, corpus_dir)
    config["teachers"][0]["model"] = str(teachers_dir / "de_bert" / "config.json")
    one_line_error(_cache_logits(tmp_path, config), "config.json is a file (give the folder that holds it")


def test_a_config_that_is_not_utf8(tmp_path):
    """Case 8."""
    (tmp_path / "latin1.yaml").write_bytes("train: {steps: 4}\n# Größe\n".encode("latin-1"))
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "latin1.yaml")])
    one_line_error(result, "is not UTF-8 text")


# ---------------------------------------------------------------- the machine says no: one line, resumable


def _refuse_writes_under(monkeypatch, folder: Path, code: int) -> None:
    """What a read-only or unwritable folder does to every write under `folder`: opening for writing and making
    folders fail with `code` (the tests run as root, whom file modes do not stop)."""
    import builtins
    import io

    def inside(path) -> bool:
        return str(path).startswith(str(folder))

    real_os_open, real_io_open, real_mkdir = os.open, io.open, os.mkdir

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def io_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(flag in mode for flag in "wax+"):
            raise OSError(code, os.strerror(code), str(file))
        return real_io_open(file, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(builtins, "open", io_open)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("code", [13, 30])  # EACCES, EROFS
def test_an_unwritable_out_folder_is_one_line_for_every_command(
    monkeypatch, tmp_path, training_cache, teachers_dir, code
):
    """Case 8: cache-logits, train, eval (before it scores) and report, into a folder they may not write."""
    out = tmp_path / "locked"
    out.mkdir()
    run = tmp_path / "run"
    assert train(tmp_path, training_cache, train_config(train={"steps": 2, "checkpoint_every": 2})).exit_code == 0
    commands = [
        ["cache-logits", "--config", str(training_cache.parent / "cache.yaml"), "--out", str(out / "cache")],
        ["train", "--config", str(write_config(tmp_path / "t.yaml", train_config())), "--cache", str(training_cache)]
        + ["--out", str(out / "run")],
        ["eval", str(teachers_dir / "de_bert"), "--cache", str(training_cache), "--eval-fraction", "0.3"]
        + ["--out", str(out / "eval.json")],
        ["report", str(run), "--out", str(out / "report")],
    ]
    _refuse_writes_under(monkeypatch, out, code)
    for command in commands:
        line = one_line_error(CliRunner().invoke(cli, command), os.strerror(code))
        assert str(out) in line
    monkeypatch.undo()
    assert not any(out.iterdir()), "nothing was written"


def test_a_full_disk_while_writing_shards_is_one_line_and_resumes(monkeypatch, tmp_path, training_cache):
    from mdkd.pipeline.cache import shards

    real_write = shards.write_shard
    calls = []

    def full_after_two(cache_folder, relative_path, table):
        calls.append(relative_path)
        if len(calls) > 2:
            raise OSError(28, os.strerror(28), cache_folder.name(relative_path))
        return real_write(cache_folder, relative_path, table)

    monkeypatch.setattr("mdkd.pipeline.cache.writer.write_shard", full_after_two)
    config = training_cache.parent / "cache.yaml"
    out = tmp_path / "cache"
    result = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", str(out)])
    one_line_error(result, "No space left on device")
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    monkeypatch.setattr("mdkd.pipeline.cache.writer.write_shard", real_write)
    result = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _shard_hashes(out) == _shard_hashes(training_cache)


def test_a_torn_last_metrics_line_is_survived_by_report_and_resume(finished_run, training_cache, tmp_path):
    """Case 8: a crash in the middle of a metrics write left half a line: report reads past it, and a resume
    replaces the file whole with the steps up to its checkpoint."""
    run, config = finished_run
    crashed = unfinished_copy(run, tmp_path / "crashed", died_after=6, last_checkpoint=4)
    with (crashed / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 7, "split": "tr')
    reported = CliRunner().invoke(cli, ["report", str(crashed), "--out", str(tmp_path / "report")])
    assert reported.exit_code == 0, reported.output
    resumed = train(tmp_path, training_cache, config, "crashed", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert [m["step"] for m in metrics(crashed)] == list(range(1, 9))
