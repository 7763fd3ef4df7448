"""The text-pool config with its pool and its run directory in a bucket (moto's S3 on loopback),
under both runners: the kept rows, rejects and ledger equal those of a run on local disk; then
``inspect`` and ``card`` on the run in the bucket."""

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
