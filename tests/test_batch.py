"""Batch runs from YAML configs: validation, isolation of failures, resume, parallelism, interruption."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jsonschema
import pytest
import torch

from conftest import ROOT, invoke, started
from lstmopt.artifacts.metadata import read_metadata
from lstmopt.job.batch import run_batch
from lstmopt.job.config import load_config
from lstmopt.errors import UsageError
from lstmopt.reporting.report import schema
from models import Tagger, build_forecaster, build_tagger

TESTS = str(ROOT / "tests")


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def models(tmp_path):
    torch.save(build_forecaster().state_dict(), tmp_path / "forecaster.pt")
    torch.save(build_tagger().state_dict(), tmp_path / "tagger.pt")
    g = torch.Generator().manual_seed(0)
    torch.save([(torch.randint(0, 50, (2, 6), generator=g), torch.tensor([6, 3]))], tmp_path / "tagger_in.pt")
    return tmp_path


def config(tmp_path, jobs, defaults=""):
    """A config in tmp_path whose factories come from tests/models.py."""
    path = tmp_path / "batch.yaml"
    path.write_text(f"pythonpath: [{TESTS}]\ndefaults:\n  format: pickle\n{textwrap.indent(defaults, '  ')}"
                    f"jobs:\n{textwrap.indent(jobs, '  ')}")
    return path


GOOD = """\
- name: forecaster
  input: forecaster.pt
  output: out/forecaster.pt
  factory: models:build_forecaster
  input_shape: [2, 8, 3]
- name: tagger
  input: tagger.pt
  output: out/tagger.pt
  factory: models:build_tagger
  example_inputs: tagger_in.pt
"""


def test_the_example_config_runs_end_to_end(tmp_path):
    env = dict(os.environ, MODELS_DIR=str(tmp_path / "models"), OUT_DIR=str(tmp_path / "out"))
    subprocess.run([sys.executable, str(ROOT / "examples" / "save_models.py")], env=env, check=True,
                   capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "lstmopt", "batch", str(ROOT / "configs" / "examples.yaml"),
                           "--report", str(tmp_path / "batch.json"), "--summary", str(tmp_path / "batch.md"),
                           "--jobs", "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "batch.json").read_text())
    assert report["schema"] == "lstmopt.batch-report/1" and report["summary"]["ok"] == 4
    for job in report["jobs"]:
        jsonschema.validate(job, schema())
        assert job["verification"]["ok"] and job["verification"]["max_abs_error"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "forecaster.ts.pt", "speech_encoder.ts.pt", "streaming.ts.pt", "tagger.ts.pt"]
    assert "4/4 jobs succeeded" in (tmp_path / "batch.md").read_text()


def test_every_shipped_config_validates(monkeypatch):
    monkeypatch.delenv("MODELS_DIR", raising=False)
    for path in (ROOT / "configs").glob("*.yaml"):
        assert load_config(path).jobs, path


@pytest.mark.parametrize("text, message", [
    ("jobs:\n  - input: a.pt\n    ouput: b.pt\n", ":2: jobs[0].output: Field required"),
    ("jobs:\n  - input: a.pt\n    output: b.pt\n    dtyp: float32\n", ":4: jobs[0].dtyp: unknown key (check its spelling)"),
    ("defaults:\n  format: onnx\njobs:\n  - {input: a.pt, output: b.pt}\n",
     ":2: defaults.format: Input should be 'auto', 'torchscript', 'pickle', 'pt2' or 'aoti', got 'onnx'"),
    ("jobs:\n  - input: a.pt\n    output: b.pt\n    input_shape: [1, 0, 3]\n",
     ":4: jobs[0].input_shape[1]: Input should be greater than 0"),
    ("jobs:\n  - input: a.pt\n    output: b.pt\n    trust: 'yes'\n", ":4: jobs[0].trust: Input should be a valid boolean"),
    ("jobs:\n  - input: a.pt\n    output: ${LSTMOPT_TEST_UNSET}/b.pt\n",
     ":3: jobs[0].output: environment variable LSTMOPT_TEST_UNSET is not set"),
    ("jobs:\n  - {input: a.pt, output: b.pt}\n  - {input: c.pt, output: b.pt}\n",
     ":3: jobs[1].output: b.pt is also the output of jobs[0]"),
    ("jobs:\n  - {input: a.pt, output: a.pt}\n", ":2: jobs[0].output: the output is the input file"),
    ("jobs:\n  - input: a.pt\n    output: b.pt\n    min_speedup: 1.5\n",
     ":2: jobs[0]: min_speedup needs inputs to time"),
    ("defaults:\n  input: a.pt\njobs:\n  - {input: a.pt, output: b.pt}\n",
     ":2: defaults.input: 'input' belongs in each job, not in defaults"),
    ("jobs: []\n", ":1: jobs: List should have at least 1 item"),
    ("jobs:\n  - input: [a\n", ":3:1: not valid YAML"),
    ("", ":1: the config must be a mapping with a 'jobs' list, got an empty file"),
    ("version: 2\njobs:\n  - {input: a.pt, output: b.pt}\n", ":1: version: Input should be 1"),
    ("jobs:\n  - {input: a.pt, output: b.pt, autotune: true}\n", ":2: jobs[0]: autotune needs inputs to time"),
    ("jobs:\n  - {input: a.pt, output: b.pt, inputs: ['int64[B=2,T=5]']}\n",
     ":2: jobs[0]: 'int64[B=2,T=5]': integers need their range as LOW..HIGH"),
    ("jobs:\n  - {input: a.pt, output: b.pt, inputs: ['float32[B=2,T=5,3]'], input_shape: [2, 5, 3]}\n",
     ":2: jobs[0]: give one of example_inputs, input_shape and inputs, not input_shape and inputs"),
])
def test_config_errors_name_the_file_line_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_config(path)
    assert f"{path}{message}" in str(info.value) and "\n" not in str(info.value)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8)) + \
    "jobs:\n  - {input: a.pt, output: b.pt, factory_kwargs: {bomb: *i}}\n"


@pytest.mark.parametrize("raw, message", [
    (BOMB.encode(), ": the config expands to over 100,000 values"),
    (b"jobs:\n  - {input: a.pt, output: b.pt}\njobs:\n  - {input: c.pt, output: d.pt}\n",
     ":3:1: not valid YAML: duplicate key 'jobs' (first at line 1)"),
    (b"jobs:\n  - input: a.pt\n    output: b.pt\n    output: c.pt\n", ":4:5: not valid YAML: duplicate key 'output'"),
    (b"jobs:\n  - input: a.pt\n    output: b.pt\n    factory_kwargs: " + b"[" * 5000 + b"]" * 5000 + b"\n",
     ":4: nested over 50 levels deep"),
    (b"jobs:\n  - input: a.pt\n    output: b\xff.pt\n", ":3: not UTF-8 text (byte 0xff)"),
    (b"# " + b"x" * (1 << 20) + b"\n", " is over 1 MB"),
    (b"jobs:\n  - input: a.pt\n    output: b.pt\n    ? [a, b]\n    : 1\n",
     ":4:7: not valid YAML: a key must be a plain value, not a list"),
    (b"jobs:\n  - input: a.pt\n    output: b\x00.pt\n", ":3:14: not valid YAML: character '\\x00' is not allowed"),
])
def test_a_hostile_config_fails_fast_with_a_line_and_exit_2(tmp_path, raw, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(raw)
    start = time.perf_counter()
    with pytest.raises(UsageError) as info:
        load_config(path)
    assert f"{path}{message}" in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 10  # bounded: the bomb alone would expand to 10^9 values
    result = invoke("batch", str(path))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_several_config_errors_are_counted_and_nothing_runs(tmp_path, models):
    path = config(tmp_path, GOOD + "- {input: x.pt, output: y.pt, fromat: pickle}\n- {input: x.pt}\n")
    result = invoke("batch", str(path))
    assert result.exit_code == 2
    assert "batch.yaml:15: jobs[2].fromat: unknown key" in result.stderr
    assert "(and 1 more: line 16 jobs[3].output)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_paths_and_variables_resolve_relative_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    monkeypatch.setenv("LSTMOPT_TEST_DIR", "deep")
    path = write(tmp_path / "cfg" / "c.yaml", """
        jobs:
          - input: ../m.pt
            output: ${LSTMOPT_TEST_DIR}/${LSTMOPT_TEST_MISSING:-x}.pt
            example_inputs: in.pt
        """)
    (job,) = load_config(path).jobs
    assert job.options.input == tmp_path / "m.pt"
    assert job.options.output == tmp_path / "cfg" / "deep" / "x.pt"
    assert job.options.example_inputs == tmp_path / "cfg" / "in.pt" and job.name == "deep/x.pt"


def test_a_failing_job_does_not_stop_or_lose_the_others(tmp_path, models):
    path = config(tmp_path, "- {name: missing, input: absent.pt, output: out/absent.pt}\n" + GOOD)
    result = invoke("batch", str(path), "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 2, result.output
    assert "1 of 3 jobs failed; first: missing: " in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [j["status"] for j in report["jobs"]] == ["error", "ok", "ok"]
    assert (tmp_path / "out" / "tagger.pt").exists() and (tmp_path / "out" / "forecaster.pt").exists()


def test_fail_fast_cancels_the_rest(tmp_path, models):
    path = config(tmp_path, "- {name: missing, input: absent.pt, output: out/absent.pt}\n" + GOOD)
    result = invoke("batch", str(path), "--fail-fast", "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert [j["status"] for j in report["jobs"]] == ["error", "cancelled", "cancelled"]
    assert "--fail-fast after job 'missing' failed" in report["jobs"][1]["error"]
    assert not (tmp_path / "out" / "tagger.pt").exists()


def test_resume_skips_up_to_date_jobs_and_redoes_changed_ones(tmp_path, models):
    path = config(tmp_path, GOOD)
    first = json.loads(invoke("batch", str(path), "--json").stdout)
    assert [j["status"] for j in first["jobs"]] == ["ok", "ok"]
    stamp = (tmp_path / "out" / "tagger.pt").stat().st_mtime_ns

    second = json.loads(invoke("batch", str(path), "--json").stdout)
    assert [j["status"] for j in second["jobs"]] == ["skipped", "skipped"]
    assert (tmp_path / "out" / "tagger.pt").stat().st_mtime_ns == stamp
    jsonschema.validate(second["jobs"][0], schema())

    torch.manual_seed(3)
    torch.save(Tagger().state_dict(), tmp_path / "tagger.pt")  # same shapes, other weights
    path.write_text(path.read_text().replace("input_shape: [2, 8, 3]", "input_shape: [3, 8, 3]"))
    third = json.loads(invoke("batch", str(path), "--json").stdout)
    assert [j["status"] for j in third["jobs"]] == ["ok", "ok"]  # new input bytes; new options

    forced = json.loads(invoke("batch", str(path), "--json", "--force").stdout)
    assert [j["status"] for j in forced["jobs"]] == ["ok", "ok"]


def test_a_rerun_removes_what_a_killed_run_left_beside_its_outputs(tmp_path, models):
    path = config(tmp_path, GOOD)
    (tmp_path / "out").mkdir()
    leftover = tmp_path / "out" / ".tagger.pt.lstmopt-tmp-abc123"  # as atomic_path names it
    leftover.write_bytes(b"half a model")
    os.utime(leftover, (time.time() - 60, time.time() - 60))  # a temporary file nobody holds, and not new
    live = tmp_path / "out" / ".tagger.pt.lstmopt-tmp-live"  # a concurrent run's: locked, so kept
    live.write_bytes(b"being written")
    os.utime(live, (time.time() - 60, time.time() - 60))
    holder = open(live, "rb")
    fcntl.flock(holder, fcntl.LOCK_EX)
    unrelated = tmp_path / "out" / ".keep-me"
    unrelated.write_bytes(b"not ours")
    assert run_batch(load_config(path)).exit_code == 0
    assert not leftover.exists() and unrelated.exists() and live.exists()
    holder.close()


def test_a_foreign_file_at_an_output_is_only_replaced_with_force(tmp_path, models):
    path = config(tmp_path, GOOD)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tagger.pt").write_bytes(b"someone else's file")
    report = json.loads(invoke("batch", str(path), "--json").stdout)
    assert [j["status"] for j in report["jobs"]] == ["ok", "error"] and "pass --force" in report["jobs"][1]["error"]
    assert (tmp_path / "out" / "tagger.pt").read_bytes() == b"someone else's file"
    report = json.loads(invoke("batch", str(path), "--json", "--force").stdout)
    assert report["jobs"][1]["status"] == "ok"


def test_parallel_jobs_overlap_and_say_their_timings_are_noisy(tmp_path, models):
    path = config(tmp_path, GOOD, defaults="benchmark: true\n")
    result = run_batch(load_config(path), parallel=2)
    assert result.exit_code == 0
    (a, b) = result.reports
    assert a["started"] <= b["finished"] and b["started"] <= a["finished"]
    assert all("jobs ran in parallel" in w for r in result.reports for w in r["warnings"][-1:])


def test_a_job_that_kills_its_process_fails_alone(tmp_path, models):
    (tmp_path / "crasher.py").write_text("import os, signal\ndef build():\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    path = config(tmp_path, GOOD + "- {name: crash, input: tagger.pt, output: out/crash.pt, factory: crasher:build}\n")
    path.write_text(path.read_text().replace(f"pythonpath: [{TESTS}]", f"pythonpath: [{TESTS}, {tmp_path}]"))
    result = run_batch(load_config(path))
    assert [r["status"] for r in result.reports] == ["ok", "ok", "error"]
    assert "the job's process died (signal SIGSEGV)" in result.reports[2]["error"]


def test_interrupting_a_batch_keeps_finished_outputs_and_leaves_no_partial_files(tmp_path, models):
    torch.save(build_forecaster(hidden=512).state_dict(), tmp_path / "big.pt")
    jobs = GOOD.split("- name: tagger")[0] + (
        "- name: big\n  input: big.pt\n  output: out/big.pt\n  factory: models:build_forecaster\n"
        "  factory_kwargs: {hidden: 512}\n  input_shape: [64, 400, 3]\n  benchmark: true\n")
    path = config(tmp_path, jobs)
    with started([sys.executable, "-m", "lstmopt", "batch", str(path), "--report", str(tmp_path / "r.json")],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.time() + 180
        while time.time() < deadline and not (tmp_path / "out" / "forecaster.pt").exists():
            time.sleep(0.1)
        time.sleep(4)  # the big job is running now
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["forecaster.pt"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [j["status"] for j in report["jobs"]] == ["ok", "interrupted"] and report["status"] == "interrupted"


def test_two_runs_of_one_config_at_once_both_succeed_and_write_each_output_once(tmp_path, models):
    path = config(tmp_path, GOOD)
    command = [sys.executable, "-m", "lstmopt", "batch", str(path), "--json"]
    with started(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as one, \
            started(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as two:
        reports = [json.loads(run.communicate(timeout=600)[0]) for run in (one, two)]
    assert all(r["exit_code"] == 0 for r in reports), reports
    statuses = sorted(j["status"] for r in reports for j in r["jobs"])
    assert statuses == ["ok", "ok", "skipped", "skipped"]  # one wrote each output, the other found it done
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["forecaster.pt", "tagger.pt"]


def test_a_job_whose_factory_code_changed_is_not_up_to_date(tmp_path, models):
    (tmp_path / "mine.py").write_text("from models import build_tagger\ndef build():\n    return build_tagger()\n")
    jobs = "- {name: tagger, input: tagger.pt, output: out/tagger.pt, factory: mine:build}\n"
    path = config(tmp_path, jobs)
    path.write_text(path.read_text().replace(f"pythonpath: [{TESTS}]", f"pythonpath: [{TESTS}, {tmp_path}]"))
    assert [r["status"] for r in run_batch(load_config(path)).reports] == ["ok"]
    assert [r["status"] for r in run_batch(load_config(path)).reports] == ["skipped"]
    (tmp_path / "mine.py").write_text((tmp_path / "mine.py").read_text() + "# the model changed\n")
    assert [r["status"] for r in run_batch(load_config(path)).reports] == ["ok"]


def test_an_output_whose_forged_metadata_claims_up_to_date_is_redone_not_trusted(tmp_path, models):
    import zipfile

    path = config(tmp_path, GOOD)
    assert run_batch(load_config(path)).exit_code == 0
    output = tmp_path / "out" / "tagger.pt"
    with zipfile.ZipFile(output) as real:
        records = {i.filename: real.read(i) for i in real.infolist()}
    name = next(n for n in records if n.endswith("/extra/lstmopt.json"))
    meta = json.loads(records[name])
    meta["source"] = "forged"  # what the skip check reads, in a shape lstmopt never writes
    records[name] = json.dumps(meta).encode()
    with zipfile.ZipFile(output, "w") as forged:
        for n, data in records.items():
            forged.writestr(n, data)
    result = run_batch(load_config(path))
    assert result.exit_code == 2 and result.reports[1]["status"] == "error"
    assert "pass --force" in result.reports[1]["error"]  # not an lstmopt artifact: kept, not replaced


def test_variables_expanded_into_a_config_stay_out_of_reports_unless_asked(tmp_path, models, monkeypatch):
    monkeypatch.setenv("LSTMOPT_TEST_TOKEN", "s3cr3t-t0ken")
    monkeypatch.setenv("LSTMOPT_TEST_OUT", str(tmp_path / "private-build-dir"))
    jobs = ("- {name: tagger, input: tagger.pt, output: '${LSTMOPT_TEST_OUT}/tagger.pt', factory: models:build_tagger,\n"
            "   factory_kwargs: {token: '${LSTMOPT_TEST_TOKEN}'}}\n")
    path = config(tmp_path, jobs)
    result = invoke("batch", str(path), "--json", "--report", str(tmp_path / "r.json"),
                                 "--summary", str(tmp_path / "s.md"))
    assert result.exit_code == 2  # build_tagger takes no token: the error names the kwargs
    shown = result.stdout + result.stderr + (tmp_path / "r.json").read_text() + (tmp_path / "s.md").read_text()
    assert "s3cr3t-t0ken" not in shown and "private-build-dir" not in shown
    assert "${LSTMOPT_TEST_TOKEN}" in shown
    result = invoke("batch", str(path), "--json", "--show-variables")
    assert "s3cr3t-t0ken" in result.stdout


def test_shards_split_a_config_deterministically_into_balanced_disjoint_slices(tmp_path, models):
    jobs = "".join(f"- name: job{i}\n  input: forecaster.pt\n  output: out/f{i}.pt\n  factory: models:build_forecaster\n"
                   for i in range(7))
    loaded = load_config(config(tmp_path, jobs))
    slices = [[job.name for job in loaded.sharded(i, 3).jobs] for i in (1, 2, 3)]
    assert slices == [["job0", "job3", "job6"], ["job1", "job4"], ["job2", "job5"]]
    assert slices == [[job.name for job in load_config(tmp_path / "batch.yaml").sharded(i, 3).jobs] for i in (1, 2, 3)]
    with pytest.raises(UsageError, match="1 <= I <= N"):
        loaded.sharded(4, 3)


def test_shard_reports_merge_into_the_report_of_the_whole_config(tmp_path, models):
    path = config(tmp_path, GOOD)
    for i in (1, 2):
        result = invoke("batch", str(path), "--shard", f"{i}/2", "--report", str(tmp_path / f"shard-{i}.json"), "--quiet")
        assert result.exit_code == 0, result.output
    shard = json.loads((tmp_path / "shard-2.json").read_text())
    assert shard["shard"] == {"index": 2, "count": 2, "jobs": [1], "config_jobs": 2} and len(shard["jobs"]) == 1
    merged_path = tmp_path / "batch.json"
    result = invoke("merge-reports", str(tmp_path / "shard-2.json"), str(tmp_path / "shard-1.json"),
                    "--report", str(merged_path), "--summary", str(tmp_path / "batch.md"))
    assert result.exit_code == 0, result.output
    merged = json.loads(merged_path.read_text())
    assert [job["job"] for job in merged["jobs"]] == ["forecaster", "tagger"]  # config order
    assert merged["summary"]["ok"] == merged["summary"]["total"] == 2 and merged["merged_shards"] == 2
    assert len(merged["environments"]) == 2 and "tagger" in (tmp_path / "batch.md").read_text()
    for job in merged["jobs"]:
        jsonschema.validate(job, schema())

    # A failure in any shard is the merged run's exit code; missing, doubled or foreign shards are refused.
    shard["jobs"][0].update(status="verification_failed", exit_code=5, error="worse than the tolerance")
    (tmp_path / "failed-2.json").write_text(json.dumps(shard))
    failed = invoke("merge-reports", str(tmp_path / "shard-1.json"), str(tmp_path / "failed-2.json"))
    assert failed.exit_code == 5 and "first: tagger: worse than the tolerance" in failed.stderr
    missing = invoke("merge-reports", str(tmp_path / "shard-1.json"))
    assert missing.exit_code == 2 and "missing 2/2" in missing.stderr
    twice = invoke("merge-reports", str(tmp_path / "shard-1.json"), str(tmp_path / "shard-1.json"))
    assert twice.exit_code == 2 and "twice 1/2" in twice.stderr
    (tmp_path / "other-2.json").write_text(json.dumps(dict(shard, config_sha256="0" * 64)))
    foreign = invoke("merge-reports", str(tmp_path / "shard-1.json"), str(tmp_path / "other-2.json"))
    assert foreign.exit_code == 2 and "different configs" in foreign.stderr


@pytest.mark.parametrize("fmt", ["pt2", "aoti"])
def test_a_program_job_is_verified_reported_and_then_up_to_date(tmp_path, models, fmt):
    jobs = ("- {name: forecaster, input: forecaster.pt, output: out/forecaster.pt2, factory: models:build_forecaster,\n"
            f"   input_shape: [2, 8, 3], format: {fmt}, approx: true}}\n")
    path = config(tmp_path, jobs)
    first = json.loads(invoke("batch", str(path), "--json").stdout)
    job = first["jobs"][0]
    assert job["status"] == "ok", job
    jsonschema.validate(job, schema())
    assert job["output"]["format"] == fmt and job["artifact"]["lstmopt_ops"] and job["verification"]["ok"]
    assert read_metadata(tmp_path / "out" / "forecaster.pt2")["format"] == fmt
    second = json.loads(invoke("batch", str(path), "--json").stdout)
    assert second["jobs"][0]["status"] == "skipped"


def test_jobs_describe_integer_and_tuple_inputs_with_specs(tmp_path):
    """A tagger taking token ids and lengths, described in the config instead of a file of examples."""
    torch.save(build_tagger().state_dict(), tmp_path / "tagger.pt")
    path = config(tmp_path, """\
- input: tagger.pt
  output: out/tagger.pt
  factory: models:build_tagger
  inputs: ["int64[B=3,T=9]:0..50", "lengths[B]"]
""")
    (job,) = run_batch(load_config(path)).reports
    assert job["status"] == "ok", job["error"]
    assert job["verification"]["samples"] == ["(3, 9) int64, (3,) int64", "(3, 2) int64, (3,) int64",
                                              "(1, 9) int64, (1,) int64", "(1, 2) int64, (1,) int64"]


def test_the_users_pythonpath_reaches_the_isolated_workers(tmp_path, models):
    """The factory's module is only on PYTHONPATH, not in the config: as for lstmopt optimize, it imports."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "only_on_pythonpath.py").write_text("from models import build_forecaster as build\n")
    path = tmp_path / "batch.yaml"
    path.write_text("jobs:\n  - {input: forecaster.pt, output: out/f.pt, factory: only_on_pythonpath:build,"
                    " input_shape: [2, 6, 3], format: pickle}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), TESTS]))
    proc = subprocess.run([sys.executable, "-m", "lstmopt", "batch", str(path), "--report", str(tmp_path / "r.json")],
                          env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["jobs"][0]["status"] == "ok"


def test_an_output_holding_only_a_copied_metadata_record_is_redone_not_skipped(tmp_path, models):
    """Metadata is anyone's to write: a zip with nothing but a schema-valid lstmopt.json copied from a real
    output is not "up to date"; only lstmopt's own record of what it wrote proves that."""
    import zipfile

    path = config(tmp_path, GOOD)
    assert run_batch(load_config(path)).exit_code == 0
    output = tmp_path / "out" / "tagger.pt"
    with zipfile.ZipFile(output) as real:
        name = next(n for n in real.namelist() if n.endswith("/extra/lstmopt.json"))
        record = real.read(name)
    with zipfile.ZipFile(output, "w") as forged:
        forged.writestr(name, record)  # 400 bytes: no model in it
    result = run_batch(load_config(path))
    assert result.exit_code == 0 and [r["status"] for r in result.reports] == ["skipped", "ok"]
    assert read_metadata(output)["source"]["sha256"] and output.stat().st_size > 10_000  # a real artifact again
    assert torch.load(output, weights_only=False) is not None
    # and the real one, untouched, is up to date
    assert [r["status"] for r in run_batch(load_config(path)).reports] == ["skipped", "skipped"]


def test_force_holds_for_a_run_that_waited_for_another_run_writing_the_same_output(tmp_path, models):
    """Run B starts with --force while run A holds the output's lock; B waits, then redoes the output (the
    decision to replace it is taken once B holds the lock, not before)."""
    import fcntl

    torch.save(build_forecaster(hidden=384).state_dict(), tmp_path / "big.pt")
    path = config(tmp_path, "- name: big\n  input: big.pt\n  output: out/big.pt\n  factory: models:build_forecaster\n"
                            "  factory_kwargs: {hidden: 384}\n  input_shape: [32, 200, 3]\n")
    lock = tmp_path / "out" / ".big.pt.lstmopt-lock"
    with started([sys.executable, "-m", "lstmopt", "batch", str(path), "--json"], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True) as first:
        deadline = time.time() + 300
        while time.time() < deadline:  # until A's worker holds the lock
            if lock.exists():
                fd = os.open(lock, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    break
                finally:
                    os.close(fd)
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "lstmopt", "batch", str(path), "--force", "--json"],
                                capture_output=True, text=True, timeout=600)
        first_out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, first_out
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert [j["status"] for j in json.loads(second.stdout)["jobs"]] == ["ok"]
