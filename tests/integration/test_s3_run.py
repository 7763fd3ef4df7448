"""Pools and run directories in a bucket (moto's S3 on loopback): the text-pool config under both
runners gives the kept rows, rejects and ledger of a run on local disk, and ``inspect``, ``card`` and
a resume work on the run in the bucket; a driver killed with SIGKILL mid-phase resumes there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from pipelines.demo.pool import write_demo_pool
from pipelines.engine.rundir import REJECTS_DIR
from pipelines.stage import RunFiles
from tests.conftest import REPO_ROOT, TEXT_ONLY_HOST, read_phase, read_rejects
from tests.s3_server import s3_server

VLMCURATE = str(Path(sys.executable).parent / "vlmcurate")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VLMCURATE, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )


def _phase(run: RunFiles, folder: str) -> pa.Table:
    return pa.concat_tables([run.read_table(path) for path in run.parquet_files(folder)]).sort_by("source_index")


def test_text_pool_on_s3_equals_the_run_on_disk_under_both_runners(tmp_path):
    pool = tmp_path / "pool.csv"
    write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=3000, seed=11)
    local = _cli("run", "configs/text-pool.yaml", f"input={pool}", f"output_dir={tmp_path / 'local'}", env={})
    assert local.returncode == 0, local.stdout + local.stderr
    local_run = tmp_path / "local" / "text-pool"
    manifest = RunFiles(str(local_run)).read_manifest()
    kept, rejects = read_phase(local_run, manifest.final_phase), read_rejects(local_run)
    with s3_server() as s3:
        bucket = s3.bucket("curation")
        s3.put_file(f"{bucket}/pools/pool.csv", str(pool))
        for runner in ("local", "ray"):
            out = f"{bucket}/runs-{runner}"
            done = _cli(
                "run",
                "configs/text-pool.yaml",
                f"input={bucket}/pools/pool.csv",
                f"output_dir={out}",
                f"runner={runner}",
                "ray.num_cpus=2",
                env=s3.env,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            run = RunFiles(f"{out}/text-pool")
            remote = run.read_manifest()
            assert remote.status == "complete" and remote.config_hash == manifest.config_hash
            assert remote.stage_totals() == manifest.stage_totals()
            assert _phase(run, remote.final_phase).equals(kept)
            remote_rejects = pa.concat_tables(
                [run.read_table(p) for phase in remote.phases for p in run.parquet_files(f"{REJECTS_DIR}/{phase.name}")]
            )
            assert remote_rejects.sort_by("source_index").equals(rejects.sort_by("source_index"))
            assert run.exists(run.path("README.md"))
        shown = _cli("inspect", f"{bucket}/runs-ray/text-pool", env=s3.env)
        assert shown.returncode == 0 and "exact_duplicates" in shown.stdout, shown.stdout + shown.stderr
        # A rerun resumes the finished run in the bucket (nothing to redo), and the card is rewritten there.
        rerun = _cli(
            "run",
            "configs/text-pool.yaml",
            f"input={bucket}/pools/pool.csv",
            f"output_dir={bucket}/runs-local",
            env=s3.env,
        )
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        resumed = RunFiles(f"{bucket}/runs-local/text-pool").read_manifest()
        assert resumed.history and "resumed_at" in resumed.history[-1] and resumed.config_hash == manifest.config_hash
        card = _cli("card", f"{bucket}/runs-local/text-pool", env=s3.env)
        assert card.returncode == 0 and "README.md" in card.stdout, card.stdout + card.stderr
        retry = _cli("retry-failed", f"{bucket}/runs-local/text-pool", env=s3.env)
        assert retry.returncode == 0 and "nothing to retry" in retry.stdout, retry.stdout + retry.stderr
        # The export of a run in the bucket is written there too.
        exported = _cli(
            "run",
            "configs/text-pool.yaml",
            f"input={bucket}/pools/pool.csv",
            f"output_dir={bucket}/runs-export",
            "export.formats=[parquet]",
            "export.samples_per_shard=1000",
            env=s3.env,
        )
        assert exported.returncode == 0, exported.stdout + exported.stderr
        run = RunFiles(f"{bucket}/runs-export/text-pool")
        files = run.parquet_files("export/parquet")
        assert len(files) == -(-kept.num_rows // 1000)
        rows = pa.concat_tables([run.read_table(f) for f in files]).sort_by("source_index")
        assert rows.select(kept.column_names).equals(kept)


def test_sigkill_mid_run_on_s3_then_resume_equals_the_run_on_disk(tmp_path):
    """The driver and its Ray killed part-way through a phase; the rerun takes the run directory's
    lease over (its holder is gone), redoes only the unfinished shards, and ends with the rows of an
    uninterrupted run on local disk."""
    import yaml

    from pipelines.engine.runner import LocalRunner
    from tests.conftest import run_pipeline_dict
    from tests.integration.killing import finished_shards, kill_after, run_command
    from tests.integration.test_resume_sigkill import SHARDS, _config

    pool = tmp_path / "pool.csv"
    write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=SHARDS * 250 - 10, seed=7)
    with s3_server() as s3:
        bucket = s3.bucket("killed")
        s3.put_file(f"{bucket}/pool.csv", str(pool))
        config = {**_config(tmp_path, pool, "kill", seconds=0.4), "input": f"{bucket}/pool.csv"}
        config["output_dir"] = f"{bucket}/runs"
        config_path = tmp_path / "kill.yaml"
        config_path.write_text(yaml.safe_dump(config))
        command = run_command(config_path)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        run_uri = f"{bucket}/runs/kill"
        done_before = kill_after(command, run_uri, "01_slow", 3, tmp_path / "first.log", env=env)
        assert 3 <= len(done_before) < SHARDS, "the kill must land part-way through the phase"
        resumed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        run = RunFiles(run_uri)
        manifest = run.read_manifest()
        assert manifest.status == "complete" and len(finished_shards(run_uri, "01_slow")) == SHARDS
        got = _phase(run, manifest.final_phase)
    reference_plan, reference = run_pipeline_dict(
        {**_config(tmp_path, pool, "reference", seconds=0), "runner": "local"}, LocalRunner()
    )
    expected = read_phase(reference_plan.run_uri, reference.final_phase)
    assert len(set(got["uid"].to_pylist())) == got.num_rows  # no duplicate
    assert got.equals(expected)  # no missing uid, same rows


def test_a_pool_with_its_own_uids_in_a_bucket_rejects_their_repeats_as_on_disk(tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    csv = tmp_path / "pool.csv"
    write_demo_pool(str(csv), TEXT_ONLY_HOST, rows=3000, seed=5)
    table = pacsv.read_csv(csv, parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"))
    keys = pa.array([f"id-{i % 2400}" for i in range(table.num_rows)])  # every row past 2,400 repeats one
    pool = tmp_path / "pool.parquet"
    pq.write_table(table.append_column("key", keys), pool, row_group_size=700)
    args = ("configs/text-pool.yaml", "columns.uid=key", "shard_size=500", "ray.num_cpus=2")
    local = _cli("run", *args, f"input={pool}", f"output_dir={tmp_path / 'local'}", env={})
    assert local.returncode == 0, local.stdout + local.stderr
    local_run = RunFiles(str(tmp_path / "local" / "text-pool"))
    manifest = local_run.read_manifest()
    read = manifest.phases[0].counts["read"]
    assert read.rejected.get("duplicate_uid") == table.num_rows - 2400
    with s3_server() as s3:
        bucket = s3.bucket("uids")
        s3.put_file(f"{bucket}/pool.parquet", str(pool))
        done = _cli("run", *args, f"input={bucket}/pool.parquet", f"output_dir={bucket}/runs", "runner=ray", env=s3.env)
        assert done.returncode == 0, done.stdout + done.stderr
        run = RunFiles(f"{bucket}/runs/text-pool")
        remote = run.read_manifest()
        assert remote.stage_totals() == manifest.stage_totals()
        assert _phase(run, remote.final_phase).equals(_phase(local_run, manifest.final_phase))
        assert _phase(run, f"{REJECTS_DIR}/00_input").equals(_phase(local_run, f"{REJECTS_DIR}/00_input"))
