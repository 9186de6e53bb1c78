"""The activation cache: real models, real S3 server (moto) on loopback, resume, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from saescale.data.builder import CacheConfig, CacheError, build_cache, load_manifest
from saescale.data.format import CorruptShardError
from saescale.data.reader import ActivationCache
from saescale.lm.corpus import CorpusError
from saescale.lm.hooks import HookError, run_to_hook
from saescale.lm.models import ModelLoadError, load_causal_lm
from saescale.storage import StorageError


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from saescale.lm.corpus import iter_documents
    from saescale.lm.embedded import EMBEDDED_CORPUS

    path = tmp_path_factory.mktemp("corpus")
    for i, (_name, text) in enumerate(list(iter_documents(EMBEDDED_CORPUS))[:6]):
        (path / f"doc{i}.txt").write_text(text[5000:9000])  # ~1000 tokens each: all six are used
    return str(path)


def tiny_cfg(model, corpus, output, **kw):
    base = dict(
        model=model,
        corpus=corpus,
        output=output,
        layer=1,
        max_tokens=3000,
        rows_per_shard=700,
        use_ray=False,
        windows_per_batch=8,
    )
    base.update(kw)
    return CacheConfig(**base)


def check_rows_match_model(cache: ActivationCache, model, n_check=200, atol=2e-3):
    """Every checked row equals the model's activation for the same token, recomputed directly."""
    windows = cache.windows()
    m = cache.manifest
    table = cache.read_table(0)
    acts = cache.read_shard(0)
    wins = table.column("window").to_numpy()[:n_check]
    poss = table.column("pos").to_numpy()[:n_check]
    tokens = table.column("token_id").to_numpy()[:n_check]
    ids = windows.column("token_ids").to_pylist()
    needed = sorted(set(wins.tolist()))
    direct = run_to_hook(model, torch.tensor([ids[w] for w in needed]), m.hook, m.layer)
    where = {w: i for i, w in enumerate(needed)}
    for r, (w, p, t) in enumerate(zip(wins, poss, tokens)):
        assert ids[w][p] == t
        expected = direct[where[w], p].to(torch.float16).float()
        torch.testing.assert_close(acts[r], expected, atol=atol, rtol=1e-3)
    return len(needed)


def test_cache_on_s3_round_trip_equals_model(tiny_model_dir, corpus_dir, s3_bucket):
    url, options = s3_bucket
    cfg = tiny_cfg(tiny_model_dir, corpus_dir, f"{url}/caches/tiny", storage_options=options)
    manifest = build_cache(cfg, progress=lambda s: None)
    assert manifest.n_rows >= 3000 and len(manifest.shards) == -(-manifest.n_rows // 700)
    assert sum(s.rows for s in manifest.shards) == manifest.n_rows
    cache = ActivationCache(f"{url}/caches/tiny", options)
    model = load_causal_lm(tiny_model_dir).model
    windows_seen = check_rows_match_model(cache, model)
    # globally shuffled: the first 200 rows of shard 0 come from many windows and documents
    assert windows_seen > 30
    docs = set(cache.windows().column("doc").to_numpy()[cache.read_table(0).column("window").to_numpy()].tolist())
    assert len(docs) == len(manifest.documents) > 1
    # statistics for normalisation match the data
    all_rows = torch.cat([cache.read_shard(i, torch.float64) for i in range(len(manifest.shards))])
    torch.testing.assert_close(
        torch.tensor(manifest.stats["mean"], dtype=torch.float64), all_rows.mean(0), rtol=1e-6, atol=1e-6
    )
    assert manifest.stats["mean_sq_norm"] == pytest.approx(all_rows.pow(2).sum(1).mean().item(), rel=1e-6)
    # nothing left from the build
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    assert not fs.exists(f"{url}/caches/tiny/_work")


def test_rerun_is_identical_and_resumes(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    from saescale.data import builder

    first = build_cache(tiny_cfg(tiny_model_dir, corpus_dir, str(tmp_path / "a")), progress=lambda s: None)

    calls = []
    real = builder.compute_part

    def crash_on_third(model, cfg, plan, part):
        calls.append(part)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(model, cfg, plan, part)

    monkeypatch.setattr(builder, "compute_part", crash_on_third)
    out_b = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        build_cache(tiny_cfg(tiny_model_dir, corpus_dir, out_b), progress=lambda s: None)
    assert not os.path.exists(os.path.join(out_b, "manifest.json"))  # nothing visible as a cache
    with pytest.raises(CacheError, match="no manifest.json"):
        ActivationCache(out_b)
    calls.clear()
    monkeypatch.setattr(builder, "compute_part", lambda *a: calls.append(a[3]) or real(*a))
    second = build_cache(tiny_cfg(tiny_model_dir, corpus_dir, out_b), progress=lambda s: None)
    assert 0 not in calls and 1 not in calls  # finished parts were skipped
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]
    # a finished cache is not rebuilt; different settings are refused
    assert build_cache(tiny_cfg(tiny_model_dir, corpus_dir, out_b), progress=lambda s: None).shards == second.shards
    with pytest.raises(CacheError, match="different settings"):
        build_cache(tiny_cfg(tiny_model_dir, corpus_dir, out_b, seed=1), progress=lambda s: None)


def test_corrupt_and_truncated_shards_are_detected(tiny_model_dir, corpus_dir, tmp_path):
    out = tmp_path / "c"
    build_cache(tiny_cfg(tiny_model_dir, corpus_dir, str(out)), progress=lambda s: None)
    cache = ActivationCache(str(out))
    shard0 = out / cache.manifest.shards[0].file
    data = bytearray(shard0.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard0.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="checksum mismatch"):
        cache.read_shard(0)
    shard1 = out / cache.manifest.shards[1].file
    shard1.write_bytes(shard1.read_bytes()[:1000])
    with pytest.raises(CorruptShardError):
        cache.read_shard(1)


def test_bad_inputs_fail_clearly_and_write_nothing(tiny_model_dir, corpus_dir, tmp_path, s3_endpoint, monkeypatch):
    out = tmp_path / "bad"
    with pytest.raises(ModelLoadError, match="cannot load model"):
        build_cache(tiny_cfg(str(tmp_path / "no-such-model"), corpus_dir, str(out)), progress=lambda s: None)
    with pytest.raises(HookError, match="layer 7 is out of range"):
        build_cache(tiny_cfg(tiny_model_dir, corpus_dir, str(out), layer=7), progress=lambda s: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(CorpusError, match="produced no tokens"):
        build_cache(tiny_cfg(tiny_model_dir, str(empty), str(out)), progress=lambda s: None)
    assert not out.exists()


def test_unwritable_file_destination(tiny_model_dir, corpus_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="cannot write"):
        build_cache(tiny_cfg(tiny_model_dir, corpus_dir, str(blocker / "cache")), progress=lambda s: None)


def test_unreachable_s3_and_missing_credentials(tiny_model_dir, corpus_dir, s3_bucket, monkeypatch):
    url, options = s3_bucket
    monkeypatch.setenv("SAESCALE_STORAGE_RETRY_S", "2")  # unreachable storage is waited out that long
    dead = {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "skip_instance_cache": True,
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    with pytest.raises(CacheError, match="cannot access.*storage did not answer.*Could not connect"):
        build_cache(tiny_cfg(tiny_model_dir, corpus_dir, f"{url}/x", storage_options=dead), progress=lambda s: None)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CacheError, match="cannot (access|write).*(credentials|Credentials)"):
        build_cache(tiny_cfg(tiny_model_dir, corpus_dir, f"{url}/y", storage_options=options), progress=lambda s: None)
    with pytest.raises(StorageError):
        ActivationCache(f"{url}/y", options)


@pytest.mark.slow
def test_ray_actor_pool_gives_the_same_shards(tiny_model_dir, corpus_dir, tmp_path):
    import ray

    from saescale.service.cache_actors import ray_part_runner

    local = build_cache(tiny_cfg(tiny_model_dir, corpus_dir, str(tmp_path / "local")), progress=lambda s: None)
    try:
        via_ray = build_cache(
            tiny_cfg(tiny_model_dir, corpus_dir, str(tmp_path / "ray"), use_ray=True),
            progress=lambda s: None,
            part_runner=ray_part_runner,
        )
    finally:
        ray.shutdown()
    assert [s.sha256 for s in local.shards] == [s.sha256 for s in via_ray.shards]


@pytest.mark.slow
def test_real_smollm2_cache_on_default_corpus(tmp_path):
    from saescale.lm.embedded import EMBEDDED_CORPUS, EMBEDDED_MODEL

    cfg = CacheConfig(
        model=EMBEDDED_MODEL,
        corpus=EMBEDDED_CORPUS,
        output=str(tmp_path / "smol"),
        layer=8,
        max_tokens=3000,
        rows_per_shard=1024,
        use_ray=False,
    )
    manifest = build_cache(cfg, progress=lambda s: None)
    assert manifest.d_model == 576 and manifest.dtype == "float16" and manifest.context_length == 64
    cache = ActivationCache(cfg.output)
    model = load_causal_lm(EMBEDDED_MODEL).model
    check_rows_match_model(cache, model, n_check=64, atol=0.05)
    assert json.loads((tmp_path / "smol" / "manifest.json").read_text())["tokenizer"] == EMBEDDED_MODEL


def test_bench_cache_reports_reader_rates():
    from saescale.bench.cache import bench_cache

    result = bench_cache(d_model=64, shards=3, rows_per_shard=2048, batch_size=1024, skip_writer=True)
    assert result["reader_local"]["rows"] == 6144 and result["reader_local"]["rows_per_s"] > 0
    assert result["reader_s3"]["rows"] == 6144 and result["reader_s3"]["rows_per_s"] > 0


@pytest.mark.slow
def test_cache_job_through_ray_job_submit(tmp_path):
    """`ray start --head` on loopback, then the README's `ray job submit --working-dir . -- python
    jobs/cache.py ...`. A submitted job runs in Ray's temporary copy of the working directory, so
    a relative output (or the training job's relative data.cache) is refused in one `error:` line
    and the job fails; the README's form, an absolute output, lands the cache where asked."""
    import subprocess
    import sys

    from ray.job_submission import JobStatus, JobSubmissionClient

    from helpers import ray_head, ray_job_submit

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ)
    env.pop("SAESCALE_RUNS", None)  # the jobs' defaults stay relative, as for a new user

    def submit(job_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
        return ray_job_submit(
            [
                os.path.join(bin_dir, "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                root,
                "--submission-id",
                job_id,
                "--",
                "python",
                *entrypoint,
            ],
            env=env,
            timeout=300,
            cwd=root,
        )

    with ray_head(env, num_cpus=2) as (_, address):  # `submit` reads `address` when called
        client = JobSubmissionClient(address)
        refused = {
            "relative-cache": (
                ["jobs/cache.py", "output=runs/cache/x", "max_tokens=2000"],
                "output=runs/cache/x is a relative path",
            ),
            "relative-train": (
                ["jobs/train.py", "data.cache=runs/cache/smollm2-resid8"],
                "data.cache=runs/cache/smollm2-resid8, output_dir=runs/",
            ),
        }
        for job_id, (entrypoint, message) in refused.items():
            job = submit(job_id, *entrypoint)
            assert job.returncode != 0 and client.get_job_status(job_id) == JobStatus.FAILED
            logs = client.get_job_logs(job_id)
            errors = [line for line in logs.splitlines() if "error:" in line]
            assert len(errors) == 1 and message in errors[0], logs[-3000:]
            assert "runtime_resources/working_dir_files/" in errors[0] and "=$PWD/runs/cache/" in errors[0]
            assert "Traceback" not in logs, logs[-3000:]
        out = tmp_path / "runs" / "cache" / "x"  # the README's output=$PWD/runs/cache/... form
        job = submit("absolute-cache", "jobs/cache.py", f"output={out}", "max_tokens=2000", "rows_per_shard=1024")
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "cache ready" in job.stdout
        manifest = load_manifest(str(out))
        assert manifest.n_rows >= 2000 and manifest.d_model == 576


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_activation_column_round_trip(dtype):
    from saescale.data.format import activation_array, activations_from_column, torch_dtype

    x = torch.randn(37, 24).to(torch_dtype(dtype))
    back = activations_from_column(activation_array(x), dtype, 24)
    assert back.dtype == torch_dtype(dtype) and torch.equal(back, x)


def test_jsonl_and_parquet_corpora(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saescale.lm.corpus import iter_documents

    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["third", "fourth"]}), tmp_path / "b.parquet")
    docs = list(iter_documents(str(tmp_path)))
    assert [t for _, t in docs] == ["first doc", "second", "third", "fourth"]
    assert len({name for name, _ in docs}) == 4


def test_doc_column_matches_windows(tiny_model_dir, corpus_dir, tmp_path):
    build_cache(tiny_cfg(tiny_model_dir, corpus_dir, str(tmp_path / "d")), progress=lambda s: None)
    cache = ActivationCache(str(tmp_path / "d"))
    table = cache.read_table(1)
    window_doc = cache.windows().column("doc").to_numpy()
    assert (table.column("doc").to_numpy() == window_doc[table.column("window").to_numpy()]).all()


# ------------------------------------------------------------- resume after a killed build
@pytest.fixture(scope="module")
def reference_cache(tiny_model_dir, corpus_dir, tmp_path_factory):
    """An uninterrupted build of the tiny config, to compare resumed builds against."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    return build_cache(tiny_cfg(tiny_model_dir, corpus_dir, str(out)), progress=lambda s: None)


def killed_build(cfg: CacheConfig, parts: int | None = None):
    """The `_work/` a build killed during pass 1 leaves: its first `parts` parts (default all)
    computed by the real model, no shard assembled. Returns the build's plan."""
    from saescale.data.builder import compute_part, make_plan

    lm = load_causal_lm(cfg.model)
    plan = make_plan(cfg, lm.tokenizer)
    for p in range(len(plan.parts) if parts is None else parts):
        compute_part(lm.model, cfg, plan, p)
    return plan


def assert_same_cache(got, want):
    assert [s.sha256 for s in got.shards] == [s.sha256 for s in want.shards]
    assert got.stats == want.stats and got.n_rows == want.n_rows


def test_resume_ignores_temp_files_a_killed_write_left(tiny_model_dir, corpus_dir, tmp_path, reference_cache):
    out = tmp_path / "killed"
    cfg = tiny_cfg(tiny_model_dir, corpus_dir, str(out))
    killed_build(cfg, parts=2)
    bucket = out / "_work" / "shard-00000"
    real = sorted(bucket.glob("part-*.parquet"))[0]
    # killed between write and rename: a complete copy under a temp name (its rows would be
    # counted twice), and a torn file (unreadable Parquet)
    (bucket / f".{real.name}.tmp-0123abcd").write_bytes(real.read_bytes())
    (bucket / ".something.tmp-xyz").write_bytes(b"PAR1 torn write")
    assert_same_cache(build_cache(cfg, progress=lambda s: None), reference_cache)
    assert not (out / "_work").exists()


def test_resume_skips_published_shards_and_reassembles_damaged_ones(
    tiny_model_dir, corpus_dir, tmp_path, reference_cache
):
    import shutil

    from saescale.data.builder import publish_shard

    out = tmp_path / "pass2"
    cfg = tiny_cfg(tiny_model_dir, corpus_dir, str(out))
    plan = killed_build(cfg)
    publish_shard(cfg, plan, 0)  # killed in pass 2, after shards 0 and 1
    publish_shard(cfg, plan, 1)
    shutil.rmtree(out / "_work" / "shard-00000")  # shard 0 can only succeed by not being re-assembled
    damaged = out / "shards" / "shard-00001.parquet"  # shard 1's file no longer has the recorded bytes
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert_same_cache(build_cache(cfg, progress=lambda s: None), reference_cache)


def test_cache_job_reports_a_corrupt_bucket_in_one_line(tiny_model_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    """`python jobs/cache.py`, run as __main__ in this process (a fresh interpreter spends ~8 s
    importing): a damaged bucket file is one error line and exit status 2, not a traceback."""
    import runpy
    import sys

    out = tmp_path / "corrupt"
    cfg = tiny_cfg(tiny_model_dir, corpus_dir, str(out), max_tokens=800)
    killed_build(cfg)
    (out / "_work" / "shard-00000" / "part-00000.parquet").write_bytes(b"not parquet\nat all")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [f"{k}={v}" for k, v in cfg.identity().items()] + [f"output={out}", "use_ray=false", "windows_per_batch=8"]
    monkeypatch.setattr(sys, "argv", ["jobs/cache.py", *args, "hydra/job_logging=none", "hydra/hydra_logging=none"])
    monkeypatch.setenv("SAESCALE_RUNS", str(tmp_path / "runs"))
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(os.path.join(root, "jobs", "cache.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exited.value.code == 2, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), err[-3000:]
    assert "part-00000.parquet: unreadable Parquet" in errors[0]
    assert not (out / "manifest.json").exists()


def test_special_tokens_are_not_cached_by_default(tiny_model_dir, tmp_path):
    """BOS starts every window and the text spells chat/eos tokens, which the tokenizer turns into
    their special ids: none of them may become a cached row."""
    import numpy as np
    from transformers import AutoTokenizer

    special = set(AutoTokenizer.from_pretrained(tiny_model_dir).all_special_ids)
    corpus = tmp_path / "chat"
    corpus.mkdir()
    (corpus / "chat.txt").write_text(
        " ".join(f"<|im_start|>user line {i} of a chat<|im_end|><|endoftext|>" for i in range(80))
    )
    cfg = tiny_cfg(tiny_model_dir, str(corpus), str(tmp_path / "out"), max_tokens=600, rows_per_shard=256)
    assert cfg.drop_special_tokens  # the default under test
    manifest = build_cache(cfg, progress=lambda s: None)
    cache = ActivationCache(cfg.output)
    window_ids = [t for ids in cache.windows().column("token_ids").to_pylist() for t in ids]
    assert special <= set(window_ids)  # the input really holds every special token
    cached = np.concatenate([cache.read_table(i).column("token_id").to_numpy() for i in range(len(manifest.shards))])
    assert not special & set(cached.tolist())
    assert manifest.n_rows == len(cached) == sum(t not in special for t in window_ids)
