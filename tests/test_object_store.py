"""Caches on an object store: an S3 server (moto's server mode) on 127.0.0.1, started here, holds them.

Stage one into a bucket writes the same bytes as to a local disk, survives kill -9 and two ranks, `cache verify`
checks the objects themselves, stage two and eval read the cache from the bucket, and every way of not reaching
the store is one line and exit status 2. Nothing reaches the network.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import cache_config, make_documents, torchrun, train, train_config, write_config
from safetensors.torch import load_file

from mdkd.cli import cli

BUCKET = "mdkd-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An S3 server on a free local port with one empty bucket; this process's environment points at it (and
    keeps local copies of objects in a fresh folder) for the module's tests. Yields a boto3 client."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log in the test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    variables = {
        **CREDENTIALS,
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
        "MDKD_STORE_COPIES": str(tmp_path_factory.mktemp("store_copies")),
    }
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


# What an in-process `mdkd train` leaves in os.environ for its one-process group: a subprocess must pick its own.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def environment() -> dict[str, str]:
    inherited = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    return {**inherited, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
    return sorted(item["Key"][len(prefix) + 1 :] for page in pages for item in page.get("Contents", []))


def read_object(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def manifest_of(client, prefix: str) -> dict:
    return json.loads(read_object(client, f"{prefix}/manifest.json"))


def shard_hashes(manifest: dict) -> dict[str, str]:
    return {shard["path"]: shard["sha256"] for shard in manifest["shards"]}


def copy_prefix(client, source: str, target: str) -> None:
    for key in keys(client, source):
        client.copy_object(
            Bucket=BUCKET, Key=f"{target}/{key}", CopySource={"Bucket": BUCKET, "Key": f"{source}/{key}"}
        )


def one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def bucket_cache(store, training_cache) -> str:
    """The training cache's config, cached again into the bucket."""
    uri = f"s3://{BUCKET}/training-cache"
    config = training_cache.parent / "cache.yaml"
    result = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", uri])
    assert result.exit_code == 0, result.output
    return uri


def test_stage_one_into_a_bucket_writes_the_bytes_it_writes_to_disk(store, bucket_cache, training_cache):
    local = json.loads((training_cache / "manifest.json").read_text())
    remote = manifest_of(store, "training-cache")
    assert remote["complete"] is True
    assert shard_hashes(remote) == shard_hashes(local)
    for path in shard_hashes(local):
        assert read_object(store, f"training-cache/{path}") == (training_cache / path).read_bytes()
    stored = keys(store, "training-cache")
    assert not [key for key in stored if key.startswith(".progress/")], "the markers go once the manifest is written"
    assert "logs/cache-logits.rank0.jsonl" in stored
    # The manifest in the bucket is the claim: the same command again finds the cache complete.
    again = CliRunner().invoke(
        cli, ["cache-logits", "--config", str(training_cache.parent / "cache.yaml"), "--out", bucket_cache]
    )
    assert again.exit_code == 0 and "already complete; nothing to do" in again.output


def test_a_prefix_holding_other_objects_is_not_taken_over(store, training_cache):
    store.put_object(Bucket=BUCKET, Key="somebody-else/notes.txt", Body=b"mine")
    config = training_cache.parent / "cache.yaml"
    result = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", f"s3://{BUCKET}/somebody-else"])
    one_line_error(result, "is not empty and is not an mdkd cache")
    assert keys(store, "somebody-else") == ["notes.txt"]


def test_overwrite_replaces_a_cache_of_another_config_in_the_bucket(store, bucket_cache, teachers_dir, corpus_dir):
    copy_prefix(store, "training-cache", "replaced")
    uri = f"s3://{BUCKET}/replaced"
    config = write_config(corpus_dir / "cache.yaml", cache_config(teachers_dir, corpus_dir))
    refused = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", uri])
    one_line_error(refused, "holds a cache with a different config or inputs")
    replaced = CliRunner().invoke(cli, ["cache-logits", "--config", str(config), "--out", uri, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    manifest = manifest_of(store, "replaced")
    assert manifest["complete"] and manifest["identity"] != manifest_of(store, "training-cache")["identity"]
    # Every shard object of the old cache went: none is left unlisted, and each listed one matches.
    verified = CliRunner().invoke(cli, ["cache", "verify", uri])
    assert verified.exit_code == 0, verified.output
    assert {key for key in keys(store, "replaced") if key.endswith(".parquet")} == set(shard_hashes(manifest))


def test_cache_verify_and_inspect_read_the_bucket(store, bucket_cache, training_cache):
    verified = CliRunner().invoke(cli, ["cache", "verify", bucket_cache])
    assert verified.exit_code == 0, verified.output
    assert "verified" in verified.output
    remote = CliRunner().invoke(cli, ["cache", "inspect", "--json", bucket_cache])
    local = CliRunner().invoke(cli, ["cache", "inspect", "--json", str(training_cache)])
    assert remote.exit_code == 0, remote.output
    assert remote.stdout == local.stdout


def test_a_damaged_or_missing_object_is_found_like_a_damaged_file(store, bucket_cache):
    copy_prefix(store, "training-cache", "damaged")
    uri = f"s3://{BUCKET}/damaged"
    shards = manifest_of(store, "damaged")["shards"]
    flipped, missing = shards[0]["path"], shards[1]["path"]
    original = read_object(store, f"damaged/{flipped}")
    # The same size, one byte changed: only the hash can tell (and the local copies of the intact bytes exist).
    store.put_object(
        Bucket=BUCKET, Key=f"damaged/{flipped}", Body=original[:100] + bytes([original[100] ^ 1]) + original[101:]
    )
    store.delete_object(Bucket=BUCKET, Key=f"damaged/{missing}")
    result = CliRunner().invoke(cli, ["cache", "verify", uri])
    assert result.exit_code == 1
    assert f"problem: {flipped}: sha256 differs from the manifest (the file is corrupted)" in result.stderr
    assert f"problem: {missing}: missing" in result.stderr
    config = write_config(Path(os.environ["MDKD_STORE_COPIES"]).parent / "damaged-train.yaml", train_config())
    refused = CliRunner().invoke(
        cli, ["train", "--config", str(config), "--cache", uri, "--out", str(config.parent / "r")]
    )
    one_line_error(refused, f"cache {uri} is damaged: {missing}: missing")


def test_training_and_eval_read_the_cache_from_the_bucket(store, bucket_cache, training_cache, tmp_path):
    config = train_config()
    local = train(tmp_path, training_cache, config, "local")
    remote = train(tmp_path, bucket_cache, config, "remote")
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    assert json.loads((tmp_path / "remote" / "run.json").read_text())["cache"] == bucket_cache

    def losses(run: str) -> list[tuple]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["loss"], m["kd_loss"], m["mlm_loss"]) for m in map(json.loads, lines) if "loss" in m]

    assert losses("remote") == losses("local") and losses("local")
    students = [load_file(tmp_path / run / "student" / "model.safetensors") for run in ("local", "remote")]
    assert students[0].keys() == students[1].keys()
    assert all((students[0][name] == students[1][name]).all() for name in students[0])
    # eval takes the run's cache from its record: the URI.
    scored = {}
    for run in ("local", "remote"):
        result = CliRunner().invoke(cli, ["eval", str(tmp_path / run)])
        assert result.exit_code == 0, result.output
        scored[run] = json.loads((tmp_path / run / "eval.json").read_text())
    assert scored["remote"]["cache"] == bucket_cache
    assert scored["remote"]["languages"] == scored["local"]["languages"]


def step_losses(lines: list[str]) -> list[tuple]:
    """(step, loss, KD loss, MLM loss) of each training line of a metrics.jsonl."""
    return [
        (m["step"], m["loss"], m["kd_loss"], m["mlm_loss"]) for m in map(json.loads, lines) if m["split"] == "train"
    ]


def test_a_run_on_a_bucket_trains_as_a_local_one_and_uploads_its_record_last(
    store, training_cache, tmp_path, monkeypatch
):
    from mdkd.pipeline import store as store_module

    uploads: list[str] = []
    upload = store_module.Mirror._upload
    monkeypatch.setattr(
        store_module.Mirror, "_upload", lambda self, relative: (uploads.append(relative), upload(self, relative))
    )
    config = train_config()
    local = train(tmp_path, training_cache, config, "local")
    assert local.exit_code == 0, local.output
    path = write_config(tmp_path / "remote.yaml", config)
    command = ["train", "--config", str(path), "--cache", str(training_cache), "--out", f"s3://{BUCKET}/run"]
    remote = CliRunner().invoke(cli, command)
    assert remote.exit_code == 0, remote.output
    stored = keys(store, "run")
    assert json.loads(read_object(store, "run/run.json"))["complete"] is True
    assert not [key for key in stored if key.endswith((".mdkd.lock", ".tmp"))]
    expected = sorted(
        p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*") if p.is_file()
    )
    assert stored == [key for key in expected if key != ".mdkd.lock"]
    assert (
        read_object(store, "run/student/model.safetensors")
        == (tmp_path / "local/student/model.safetensors").read_bytes()
    )
    assert step_losses(read_object(store, "run/metrics.jsonl").decode().splitlines()) == step_losses(
        (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()
    )
    # run.json goes up twice: right after the first checkpoint (incomplete) and last of all (complete); a
    # checkpoint's record goes up after that checkpoint's files.
    assert [index for index, name in enumerate(uploads) if name == "run.json"] == [
        uploads.index("checkpoints/step-0000004/mdkd-checkpoint.json") + 1,
        len(uploads) - 1,
    ]
    for step in ("0000004", "0000008"):
        folder = [index for index, name in enumerate(uploads) if name.startswith(f"checkpoints/step-{step}/")]
        assert uploads[folder[-1]] == f"checkpoints/step-{step}/mdkd-checkpoint.json" and len(folder) > 1
    # Another machine (no working copy) finds the run complete from the bucket alone.
    shutil.rmtree(Path(os.environ["MDKD_STORE_COPIES"]) / "working")
    again = CliRunner().invoke(cli, command)
    assert again.exit_code == 0 and "already complete; nothing to do" in again.output


def test_a_run_on_a_bucket_killed_then_resumed_elsewhere_gives_the_uninterrupted_losses(
    store, training_cache, tmp_path
):
    config = train_config(train={"steps": 40, "checkpoint_every": 4})
    path = write_config(tmp_path / "killed.yaml", config)
    train_command = [sys.executable, "-m", "mdkd", "train", "--config", str(path), "--cache", str(training_cache)]
    # The reference runs as the killed and resumed runs do, in a process of its own with one thread: float32 sums
    # over torch's threads change the last bits with the thread count, and this test asks for the same bits.
    reference = subprocess.run(
        [*train_command, "--out", str(tmp_path / "reference")], env=environment(), capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    uri = f"s3://{BUCKET}/killed-run"
    command = [*train_command, "--out", uri]
    errors = (tmp_path / "killed.stderr").open("w")
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if "run.json" in keys(store, "killed-run"):  # uploaded right after the first checkpoint
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    errors.close()
    assert "run.json" in keys(store, "killed-run"), (tmp_path / "killed.stderr").read_text()[-3000:]
    assert json.loads(read_object(store, "killed-run/run.json"))["complete"] is False, "the kill must land mid-run"
    checkpointed = read_object(store, "killed-run/metrics.jsonl").decode().splitlines()
    shutil.rmtree(Path(os.environ["MDKD_STORE_COPIES"]) / "working")  # resumed on a machine that has only the bucket
    resumed = subprocess.run([*command, "--resume", "auto"], env=environment(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(read_object(store, "killed-run/run.json"))["complete"] is True
    remote = step_losses(read_object(store, "killed-run/metrics.jsonl").decode().splitlines())
    assert remote == step_losses((tmp_path / "reference" / "metrics.jsonl").read_text().splitlines())
    assert [step for step, *_ in remote] == list(range(1, 41)), "every step logged once"
    # Resumed, not started over: the steps up to the checkpoint are the killed process's lines (their
    # tokens_per_second is its own timing), kept as they were.
    kept = [line for line in checkpointed if json.loads(line)["step"] <= 4]
    assert kept and read_object(store, "killed-run/metrics.jsonl").decode().splitlines()[: len(kept)] == kept


def test_a_run_on_a_bucket_refuses_a_sweep_and_a_checkpoint_path(store, training_cache, tmp_path):
    config = write_config(tmp_path / "train.yaml", train_config())
    base = ["train", "--config", str(config), "--cache", str(training_cache), "--out", f"s3://{BUCKET}/refused"]
    one_line_error(CliRunner().invoke(cli, [*base, "--sweep", "train.lr=1e-3,2e-3"]), "a sweep is written to a local")
    one_line_error(CliRunner().invoke(cli, [*base, "--resume", str(tmp_path)]), "--resume auto")
    assert keys(store, "refused") == []
    # A bucket that does not exist is found before training, not at the first checkpoint's upload.
    missing = [*base[:-1], "s3://mdkd-no-such-bucket/run"]
    one_line_error(CliRunner().invoke(cli, missing), "does not exist at http://127.0.0.1:")


# ---------------------------------------------------------------- a corpus on the bucket


def upload(client, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


def test_stage_one_reads_its_corpus_from_the_bucket_as_from_disk(store, training_cache, teachers_dir, tmp_path):
    """The training cache's corpus files as objects: the cache built from them is the local one, byte for byte
    (doc_ids name a file by its base name, the fingerprint is of its bytes, and the config hash leaves locations
    out), and eval's raw-text scoring reads the corpus from the bucket too."""
    for language in ("de", "ru"):
        store.put_object(
            Bucket=BUCKET, Key=f"corpus/{language}.txt", Body=(training_cache.parent / f"{language}.txt").read_bytes()
        )
    config = yaml.safe_load((training_cache.parent / "cache.yaml").read_text(encoding="utf-8"))
    config["corpus"] = [{"language": lang, "path": f"s3://{BUCKET}/corpus/{lang}.txt"} for lang in ("de", "ru")]
    out = tmp_path / "cache"
    result = CliRunner().invoke(
        cli, ["cache-logits", "--config", str(write_config(tmp_path / "cache.yaml", config)), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    local = json.loads((training_cache / "manifest.json").read_text())
    remote = json.loads((out / "manifest.json").read_text())
    assert remote["complete"] and shard_hashes(remote) == shard_hashes(local) and shard_hashes(local)
    assert remote["identity"] == local["identity"]
    assert [entry["source"] for entry in remote["corpus"]] == [
        f"s3://{BUCKET}/corpus/{lang}.txt" for lang in "de ru".split()
    ]
    strip = [{k: v for k, v in entry.items() if k != "source"} for entry in local["corpus"]]
    assert [{k: v for k, v in entry.items() if k != "source"} for entry in remote["corpus"]] == strip
    scored = {}
    for name, cache in (("local", training_cache), ("remote", out)):
        report = tmp_path / f"eval-{name}.json"
        arguments = [
            str(teachers_dir / "de_bert"),
            "--cache",
            str(cache),
            "--eval-fraction",
            "0.3",
            "--out",
            str(report),
        ]
        evaluated = CliRunner().invoke(cli, ["eval", *arguments])
        assert evaluated.exit_code == 0, evaluated.output
        scored[name] = {lang: v["raw_text"] for lang, v in json.loads(report.read_text())["languages"].items()}
    assert scored["remote"] == scored["local"] and scored["local"]["de"]["positions"] > 0
    # The object gone: eval says so instead of failing.
    store.delete_object(Bucket=BUCKET, Key="corpus/ru.txt")
    evaluated = CliRunner().invoke(cli, ["eval", *arguments])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(report.read_text())["languages"]["ru"]["raw_text"] == {
        "skipped": "the corpus files recorded in the cache are no longer there"
    }


def test_a_corpus_prefix_is_read_as_the_same_folder_on_disk(store, tmp_path):
    """Names whose order differs as strings and as paths (`a-b.txt` sorts before `a/x.txt` as a string, after it
    path by path), every suffix, and a file that is not corpus: the same files, order, documents and fingerprint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mdkd.pipeline.teacher_pass.config import CorpusSource
    from mdkd.pipeline.teacher_pass.corpus import read_source, scan_source

    folder = tmp_path / "corpus"
    (folder / "a").mkdir(parents=True)
    (folder / "a-b.txt").write_text("erste Zeile\n\nzweite Zeile\n", encoding="utf-8")
    (folder / "a" / "x.txt").write_bytes(b"dritte\n\xff kaputt\nvierte\n")
    (folder / "a" / "y.jsonl").write_text('{"text": "fuenfte"}\n{"text": "sechste"}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["siebte", None, "achte"]}), folder / "z.parquet")
    (folder / "notes.md").write_text("not corpus", encoding="utf-8")
    upload(store, folder, "corpus-folder")
    sources = [
        CorpusSource.model_validate({"language": "de", "path": path}, context={"base_dir": tmp_path})
        for path in (str(folder), f"s3://{BUCKET}/corpus-folder/")
    ]
    assert sources[1].path == f"s3://{BUCKET}/corpus-folder"
    names = [[name for _, name in source.files()] for source in sources]
    assert names[0] == names[1] == ["a/x.txt", "a/y.jsonl", "a-b.txt", "z.parquet"]
    documents = [list(read_source(source)) for source in sources]
    assert documents[0] == documents[1] and len(documents[0]) == 8
    assert scan_source(sources[0]) == scan_source(sources[1])


@pytest.mark.parametrize(
    "path, fragment",
    [
        (f"s3://{BUCKET}/no-such-corpus/de.txt", f"corpus object not found: s3://{BUCKET}/no-such-corpus/de.txt"),
        ("nosuchfs://bucket/de.txt", "unknown filesystem protocol"),
    ],
)
def test_a_corpus_uri_that_names_nothing_is_one_line_before_any_work(store, training_cache, tmp_path, path, fragment):
    config = yaml.safe_load((training_cache.parent / "cache.yaml").read_text(encoding="utf-8"))
    config["corpus"][0]["path"] = path
    out = tmp_path / "cache"
    result = CliRunner().invoke(
        cli, ["cache-logits", "--config", str(write_config(tmp_path / "cache.yaml", config)), "--out", str(out)]
    )
    one_line_error(result, fragment)
    assert not out.exists()


def test_a_flipped_shard_is_refused_by_stage_two_as_it_arrives(store, bucket_cache, tmp_path, monkeypatch):
    copy_prefix(store, "training-cache", "flipped")
    uri = f"s3://{BUCKET}/flipped"
    flipped = manifest_of(store, "flipped")["shards"][0]["path"]
    original = read_object(store, f"flipped/{flipped}")
    store.put_object(
        Bucket=BUCKET, Key=f"flipped/{flipped}", Body=original[:100] + bytes([original[100] ^ 1]) + original[101:]
    )
    # No kept copies: the object's own bytes arrive, of the manifest's size, and only their hash tells.
    monkeypatch.setenv("MDKD_STORE_COPIES", str(tmp_path / "fresh-copies"))
    config = write_config(tmp_path / "train.yaml", train_config())
    refused = CliRunner().invoke(cli, ["train", "--config", str(config), "--cache", uri, "--out", str(tmp_path / "r")])
    one_line_error(refused, f"cache {uri} is damaged: {flipped}: sha256 differs from the manifest")
    assert not list((tmp_path / "fresh-copies").rglob("*.tmp")), "a copy that failed its hash is not left behind"


def test_a_missing_tokenizer_copy_is_the_damaged_cache_line(store, bucket_cache, tmp_path, monkeypatch):
    from mdkd.pipeline.cache.reader import CacheReader
    from mdkd.pipeline.errors import UserError

    copy_prefix(store, "training-cache", "no-tokenizer")
    teacher = sorted(manifest_of(store, "no-tokenizer")["teachers"])[0]
    for key in keys(store, f"no-tokenizer/tokenizers/{teacher}"):
        store.delete_object(Bucket=BUCKET, Key=f"no-tokenizer/tokenizers/{teacher}/{key}")
    monkeypatch.setenv("MDKD_STORE_COPIES", str(tmp_path / "fresh-copies"))
    reader = CacheReader(f"s3://{BUCKET}/no-tokenizer")
    with pytest.raises(UserError, match=f"is damaged: tokenizers/{teacher}: tokenizer copy of teacher {teacher} is"):
        reader.tokenizer_file(teacher)


def test_a_download_that_fails_midway_leaves_no_temporary_copy(store, bucket_cache, monkeypatch):
    from mdkd.pipeline.errors import UserError
    from mdkd.pipeline.store import ObjectFolder, copies_root

    folder = ObjectFolder(bucket_cache)
    shard = manifest_of(store, "training-cache")["shards"][0]

    def half_then_fail(source, target):
        Path(target).write_bytes(b"half an object")
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(folder.fs, "get_file", half_then_fail)
    with pytest.raises(UserError, match="connection reset by peer"):
        folder.fetch(shard["path"], shard["sha256"], reread=True)
    assert not list(copies_root().rglob("*.tmp"))


def test_a_console_folder_placeholder_does_not_make_a_prefix_look_taken(store):
    from mdkd.pipeline.output_folder import claim_folder

    # What "Create folder" in the S3 console makes: a zero-byte object named like the prefix, with a slash.
    store.put_object(Bucket=BUCKET, Key="console-folder/", Body=b"")
    claim = claim_folder(
        f"s3://{BUCKET}/console-folder",
        "manifest.json",
        {},
        what="cache",
        is_record=lambda record: True,
        overwrite=False,
        resume=False,
    )
    assert claim.action == "new"


def test_a_file_uri_is_the_local_folder_it_names(training_cache, tmp_path):
    from mdkd.stages import cache_logits

    # Called without the command line, which would have turned the URI into a path before the stage sees it.
    cache_logits.run(training_cache.parent / "cache.yaml", f"file://{tmp_path}/cache")
    local = json.loads((training_cache / "manifest.json").read_text())
    written = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert written["complete"] is True and shard_hashes(written) == shard_hashes(local)
    for path in shard_hashes(local):
        assert (tmp_path / "cache" / path).read_bytes() == (training_cache / path).read_bytes()
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    assert (tmp_path / "cache" / ".mdkd.lock").exists(), "held like a plain path's lock, until this process ends"


@pytest.fixture(scope="module")
def many_units(store, tmp_path_factory, teachers_dir):
    """A config of many small units (for kill -9 and two ranks) and its cache on the local disk."""
    root = tmp_path_factory.mktemp("many_units")
    (root / "de.txt").write_text("\n".join(make_documents("de", 60, seed=3)) + "\n", encoding="utf-8")
    (root / "ru.txt").write_text("\n".join(make_documents("ru", 40, seed=3)) + "\n", encoding="utf-8")
    config = write_config(root / "cache.yaml", cache_config(teachers_dir, root, shard_documents=3))
    command = [sys.executable, "-m", "mdkd", "cache-logits", "--config", str(config), "--out", str(root / "cache")]
    subprocess.run(command, check=True, env=environment(), capture_output=True)
    return config, root / "cache"


def test_kill_minus_nine_into_a_bucket_then_rerun_writes_the_uninterrupted_bytes(store, many_units):
    config, reference = many_units
    command = [sys.executable, "-m", "mdkd", "cache-logits", "--config", str(config), "--out", f"s3://{BUCKET}/killed"]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if len([key for key in keys(store, "killed") if key.startswith(".progress/")]) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert manifest_of(store, "killed")["complete"] is False, "the kill must land mid-run"
    # The units the kill left finished: their shard objects as they are now (a rewrite gives a new LastModified).
    markers = [key for key in keys(store, "killed") if key.startswith(".progress/")]
    done = {key.removeprefix(".progress/").removesuffix(".json") + ".parquet" for key in markers}
    assert done

    def uploaded(path: str) -> tuple:
        head = store.head_object(Bucket=BUCKET, Key=f"killed/{path}")
        return head["LastModified"], head["ETag"]

    before = {path: uploaded(path) for path in done}
    time.sleep(1.1)  # LastModified counts whole seconds
    finished = subprocess.run(command, env=environment(), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    expected = shard_hashes(json.loads((reference / "manifest.json").read_text()))
    assert shard_hashes(manifest_of(store, "killed")) == expected
    for path in expected:
        assert read_object(store, f"killed/{path}") == (reference / path).read_bytes()
    assert {path: uploaded(path) for path in done} == before, "the rerun must not compute a finished unit again"
    logged = read_object(store, "killed/logs/cache-logits.rank0.jsonl").decode().splitlines()
    rerun = {json.loads(line)["path"] for line in logged[-(len(expected) - len(done)) :]}
    assert rerun == set(expected) - done, "the rerun logs exactly the units that had no marker"
    assert not [key for key in keys(store, "killed") if key.startswith(".progress/")]


def test_a_rank_log_in_a_bucket_is_uploaded_in_batches_not_after_every_unit(store, training_cache, monkeypatch):
    from mdkd.pipeline.cache.writer import LOG_UPLOAD_UNITS
    from mdkd.pipeline.store import ObjectFolder

    uploads = []
    real_write_text = ObjectFolder.write_text

    def counting(folder, relative, text):
        if relative.startswith("logs/"):
            uploads.append(len(text.splitlines()))
        real_write_text(folder, relative, text)

    monkeypatch.setattr(ObjectFolder, "write_text", counting)
    result = _cache_logits_into(f"s3://{BUCKET}/batched-log", training_cache)
    assert result.exit_code == 0, result.output
    units = len(manifest_of(store, "batched-log")["shards"])
    assert units < LOG_UPLOAD_UNITS
    assert uploads == [units], "one upload, when the rank's units are done, holding a line per unit"


def test_two_ranks_writing_to_one_bucket_make_the_cache_of_one_process(store, many_units):
    config, reference = many_units
    run = subprocess.run(
        torchrun("-m", "mdkd", "cache-logits", "--config", str(config), "--out", f"s3://{BUCKET}/two-ranks"),
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("cache complete") == 1, "console output comes from rank 0 only"
    expected = shard_hashes(json.loads((reference / "manifest.json").read_text()))
    assert shard_hashes(manifest_of(store, "two-ranks")) == expected
    stored = keys(store, "two-ranks")
    assert [key for key in stored if key.startswith("logs/")] == [
        "logs/cache-logits.rank0.jsonl",
        "logs/cache-logits.rank1.jsonl",
    ]
    rank1 = read_object(store, "two-ranks/logs/cache-logits.rank1.jsonl").decode().splitlines()
    assert {json.loads(line)["part"] % 2 for line in rank1} == {1}, "rank 1 takes the odd parts"


# ---------------------------------------------------------------- not reaching the store: one line, exit 2


def _cache_logits_into(uri: str, training_cache: Path, **env):
    config = training_cache.parent / "cache.yaml"
    return CliRunner(env=env).invoke(cli, ["cache-logits", "--config", str(config), "--out", uri])


def test_a_missing_bucket_is_one_line_for_every_command(store, training_cache, tmp_path):
    missing = "bucket no-such-bucket does not exist at http://127.0.0.1:"
    line = one_line_error(_cache_logits_into("s3://no-such-bucket/x", training_cache), missing)
    assert line.endswith("; create it first"), line
    one_line_error(CliRunner().invoke(cli, ["cache", "verify", "s3://no-such-bucket/x"]), missing)
    config = write_config(tmp_path / "train.yaml", train_config())
    trained = CliRunner().invoke(
        cli, ["train", "--config", str(config), "--cache", "s3://no-such-bucket/x", "--out", str(tmp_path / "r")]
    )
    one_line_error(trained, missing)


@pytest.mark.parametrize("uri", ["s3://", "s3:///cache"])
def test_a_uri_without_a_bucket_is_one_line(store, training_cache, uri):
    one_line_error(_cache_logits_into(uri, training_cache), "name a bucket: s3://bucket/prefix")


def test_a_uri_with_one_slash_is_refused_not_made_a_local_folder(store, training_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(_cache_logits_into("s3:/bucket/cache", training_cache), "s3://bucket/cache")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_protocol_is_one_line(store, training_cache):
    one_line_error(_cache_logits_into("nosuchfs://bucket/cache", training_cache), "unknown filesystem protocol")


def test_missing_credentials_are_one_line_and_leave_nothing(store, training_cache, tmp_path):
    result = _cache_logits_into(
        f"s3://{BUCKET}/no-credentials",
        training_cache,
        AWS_ACCESS_KEY_ID=None,
        AWS_SECRET_ACCESS_KEY=None,
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
    )
    one_line_error(result, "no credentials found")
    assert keys(store, "no-credentials") == []


def test_an_unreachable_endpoint_is_one_line_within_the_retry_bound(store, bucket_cache):
    from conftest import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    # A subprocess, so that a retry loop that never ends fails the test by its timeout instead of hanging it.
    result = subprocess.run(
        [sys.executable, "-m", "mdkd", "cache", "verify", bucket_cache],
        env={**environment(), "AWS_ENDPOINT_URL": closed},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the object store" in lines[0] and "AWS_ENDPOINT_URL" in lines[0], lines


def test_a_uri_whose_filesystem_package_is_missing_names_the_extra(store, training_cache, monkeypatch):
    import importlib

    # What fsspec meets where s3fs is not installed: no class registered for s3 yet, and `import s3fs` fails.
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    one_line_error(_cache_logits_into(f"s3://{BUCKET}/no-package", training_cache), "pip install 'mdkd[s3]'")
