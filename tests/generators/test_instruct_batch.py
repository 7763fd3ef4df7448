"""The openai-batch backend against the loopback server's files and batches API: custom_id round trip, requeues."""

from __future__ import annotations

import json

import openai
import pytest
from typer.testing import CliRunner

from generators.instruct.batch import (
    BATCH_PENDING,
    BatchClient,
    BatchSettings,
    import_result_files,
    read_results,
    request_lines,
    split_files,
)
from generators.instruct.cache import ReplyCache
from generators.instruct.chat import BUDGET_EXHAUSTED, REQUEST_FAILED, ChatSettings, EndpointError, Failure
from generators.instruct.prompts import load_prompt
from pipelines.cli.main import app
from schemas.llava import llava_json
from tests.conftest import read_phase, read_rejects, run_pipeline_dict
from tests.generators.test_instruct import assert_llava_record
from tests.generators.test_instruct_openai import KEY_ENV, _endpoint, _pool
from tests.openai_server import FOREIGN_ID, ODD_REPLIES, FakeChatServer


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")


def _messages(caption: str, kind: str = "detailed") -> list[dict[str, str]]:
    return load_prompt(kind).messages(f"<context>\nCaptions:\n- {caption}\n</context>")


def _client(server, cache, **batch) -> BatchClient:
    settings = ChatSettings(**_endpoint(server))
    return BatchClient(
        settings, BatchSettings(**{"folder": str(cache.path.parent / "batches"), "poll_interval": 0.01, **batch}), cache
    )


def test_request_files_hold_one_line_per_request_within_both_limits():
    bodies = {f"k{i}": {"model": "m", "messages": [{"role": "user", "content": "x" * i}]} for i in range(10)}
    lines = request_lines(bodies)
    first = json.loads(lines[0])
    assert first == {"custom_id": "k0", "method": "POST", "url": "/v1/chat/completions", "body": bodies["k0"]}
    files = split_files(lines, max_requests=4, max_bytes=10_000)
    assert [len(f) for f in files] == [4, 4, 2]
    by_size = split_files(lines, max_requests=100, max_bytes=2 * len(lines[-1]))
    assert all(sum(map(len, f)) <= 2 * len(lines[-1]) for f in by_size) and sum(map(len, by_size)) == 10
    with pytest.raises(ValueError, match="over max_bytes_per_file"):
        split_files(lines, max_requests=100, max_bytes=10)


def test_results_are_read_by_custom_id_and_sorted_into_replies_retries_and_failures():
    completion = {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500},
    }
    lines = [
        json.dumps({"custom_id": "b", "response": {"status_code": 200, "body": completion}, "error": None}),
        json.dumps({"custom_id": "x", "response": None, "error": {"code": "batch_expired", "message": "late"}}),
        json.dumps({"custom_id": "r", "response": {"status_code": 429, "body": {"error": {"message": "slow"}}}}),
        json.dumps({"custom_id": "f", "response": {"status_code": 400, "body": {"error": {"message": "bad"}}}}),
        "",
    ]
    outcome = read_results(lines, ChatSettings(model="m", price_input=2.0, price_output=4.0))
    assert outcome.replies["b"].text == "hi" and outcome.replies["b"].cost == pytest.approx(0.004)
    assert set(outcome.retry) == {"x", "r"} and outcome.retry["x"].startswith("batch_expired")
    assert outcome.failed == {"f": "HTTP 400: bad"} and outcome.unreadable == []


def test_a_malformed_result_line_costs_only_its_own_request(tmp_path):
    completion = {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    good = json.dumps({"custom_id": "good", "response": {"status_code": 200, "body": completion}})
    odd_body = {**completion, "choices": [{"index": 0, "message": None, "finish_reason": "stop"}]}
    lines = [
        "not json",
        "[1, 2]",
        '{"response": {}}',
        '{"custom_id": "s", "response": "a string"}',
        b"\xff\xfe{}",
        "[" * 100_000,
        good,
        json.dumps({"custom_id": "odd", "response": {"status_code": 200, "body": odd_body}}),
        json.dumps({"custom_id": "html", "response": {"status_code": 200, "body": "<html>502</html>"}}),
        json.dumps(
            {
                "custom_id": "neg",
                "response": {
                    "status_code": 200,
                    "body": {**completion, "usage": {"prompt_tokens": -100, "completion_tokens": 5}},
                },
            }
        ),
        json.dumps({"custom_id": "status", "response": {"status_code": "200", "body": completion}}),
        json.dumps({"custom_id": "err", "response": None, "error": "a plain string"}),
        json.dumps({"custom_id": "errbody", "response": {"status_code": 400, "body": {"error": "no object"}}}),
        json.dumps({"custom_id": "good", "response": None, "error": {"code": "dup", "message": "a second line"}}),
    ]
    outcome = read_results(lines, ChatSettings(model="m"))
    assert set(outcome.replies) == {"good"} and outcome.replies["good"].text == "hi"
    assert set(outcome.retry) == {"odd", "html", "neg", "status", "err"}
    assert (
        "choices[0].message is null" in outcome.retry["odd"] and "usage.prompt_tokens is -100" in outcome.retry["neg"]
    )
    assert outcome.failed == {"errbody": "HTTP 400: no object"}
    assert [u.split(":")[0] for u in outcome.unreadable] == [f"line {n}" for n in range(1, 7)]
    results = tmp_path / "results.jsonl"
    results.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    cache = ReplyCache(tmp_path / "cache.sqlite")
    assert import_result_files([results], ChatSettings(model="m"), cache).replies.keys() == {"good"}
    assert len(cache) == 1
    results.write_text("not json\n[1, 2]\n")
    with pytest.raises(ValueError, match="no line of .* is a Batch API result"):
        import_result_files([results], ChatSettings(model="m"), cache)


def test_odd_result_lines_are_sent_again_and_replies_for_other_requests_are_not_stored(tmp_path):
    odd = [action for action in ODD_REPLIES if action != "bloat"] + ["garbled"]  # no byte limit on result files
    captions = [f"a green bus {i}" for i in range(5)] + [f"a b{action} line" for action in odd]
    captions += ["a bstuck line", "a bforeign line"]
    with FakeChatServer() as server:
        for action in odd:
            server.script(f"b{action}", action)
        server.script("bstuck", "message-null", "message-null")
        server.script("bforeign", "foreign")
        cache = ReplyCache(tmp_path / "cache.sqlite")
        client = _client(server, cache, max_rounds=2)
        outcomes = client.complete([_messages(c) for c in captions])
    for caption, outcome in zip(captions, outcomes):
        if "bstuck" in caption:
            assert outcome.reason == REQUEST_FAILED and "2 batch jobs" in outcome.detail
            assert "choices[0].message is null" in outcome.detail
        else:
            assert caption in outcome.text, (caption, outcome)
    assert len(client.submitted) == 2 and cache.get(FOREIGN_ID) is None


def test_a_batch_round_trip_matches_shuffled_results_by_custom_id_and_requeues_what_expired(tmp_path):
    captions = [f"a red kite number {i}" for i in range(30)] + ["bexpire", "bvanish", "b500", "brefused", "bgone"]
    with FakeChatServer() as server:
        server.script("bexpire", "expire")
        server.script("bvanish", "vanish")
        server.script("b500", "500")
        server.script("brefused", "401")  # a per-request refusal: not retried
        server.script("bgone", "expire", "expire", "expire")
        cache = ReplyCache(tmp_path / "cache.sqlite")
        client = _client(server, cache, max_rounds=3)
        outcomes = client.complete([_messages(c) for c in captions])
        first = server.batches[client.submitted[0]]
        sent, served = (server.files[first["job"]["input_file_id"]], server.files[first["files"]["output_file_id"]])
    served_ids = [json.loads(line)["custom_id"] for line in served.decode().splitlines()]
    sent_ids = [json.loads(line)["custom_id"] for line in sent.decode().splitlines()]
    assert served_ids != [i for i in sent_ids if i in served_ids]  # the results came back in another order
    for caption, outcome in zip(captions, outcomes):
        if caption == "brefused":
            assert isinstance(outcome, Failure) and outcome.reason == REQUEST_FAILED and "401" in outcome.detail
        elif caption == "bgone":
            assert isinstance(outcome, Failure) and "3 batch jobs" in outcome.detail
        else:
            assert caption in outcome.text, (caption, outcome)  # each reply came back to its own request
    assert len(client.submitted) == 3  # the first job, its requeue, and bgone's last try
    assert max(server.answered.values()) == 1
    again = _client(server, cache).complete([_messages(c) for c in captions[:30]])
    assert [o.text for o in again] == [o.text for o in outcomes[:30]] and all(o.cached for o in again)


def test_a_job_still_running_is_polled_again_by_a_rerun_not_resubmitted(tmp_path):
    with FakeChatServer() as server:
        cache = ReplyCache(tmp_path / "cache.sqlite")
        requests = [_messages(f"a boat {i}") for i in range(5)]
        waited = _client(server, cache, max_wait=0.0).complete(requests)
        assert all(isinstance(o, Failure) and "still running" in o.detail for o in waited)
        resumed = _client(server, cache)
        outcomes = resumed.complete(requests)
        assert resumed.submitted == [] and len(server.batches) == 1
        assert [f"a boat {i}" in o.text for i, o in enumerate(outcomes)] == [True] * 5


def test_handed_off_requests_are_pending_until_their_results_are_imported(tmp_path):
    cache_path = tmp_path / "cache.sqlite"
    requests = [_messages(f"a tram {i}") for i in range(4)]
    with FakeChatServer() as server:
        client = _client(server, ReplyCache(cache_path), submit=False)
        pending = client.complete(requests)
        assert {o.reason for o in pending} == {BATCH_PENDING} and not server.batches
        files = sorted((tmp_path / "batches").glob("requests-*.jsonl"))
        assert len(files) == 1 and "import-batch" in pending[0].detail
        # The user submits the file with any tool and downloads the results ...
        user = openai.OpenAI(api_key="test-key", base_url=server.base_url)
        job = user.batches.create(
            input_file_id=user.files.create(file=files[0].open("rb"), purpose="batch").id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        while job.status not in ("completed", "failed", "expired"):
            job = user.batches.retrieve(job.id)
        results = tmp_path / "results.jsonl"
        results.write_bytes(user.files.content(job.output_file_id).content)
    # ... and imports them: the same requests are then answered from the cache.
    done = CliRunner().invoke(app, ["import-batch", str(results), "--cache", str(cache_path)])
    assert done.exit_code == 0 and "4 replies stored" in done.output, done.output
    answered = _client(server, ReplyCache(cache_path), submit=False).complete(requests)
    assert [f"a tram {i}" in o.text for i, o in enumerate(answered)] == [True] * 4


def test_budget_and_credentials_are_checked_before_anything_is_submitted(tmp_path, monkeypatch):
    with FakeChatServer(api_key="test-key") as server:
        cache = ReplyCache(tmp_path / "cache.sqlite")
        _client(server, cache).complete([_messages("a first request")])
        spent = cache.spent()[1]
        settings = ChatSettings(**_endpoint(server, max_total_tokens=spent))
        broke = BatchClient(settings, BatchSettings(folder=str(tmp_path / "b"), poll_interval=0.01), cache)
        outcome = broke.complete([_messages("one more")])[0]
        assert outcome.reason == BUDGET_EXHAUSTED and broke.submitted == []
        monkeypatch.setenv(KEY_ENV, "wrong-key")
        with pytest.raises(EndpointError, match="401"):
            _client(server, cache).complete([_messages("refused")])


def test_the_stage_with_the_batch_backend_writes_valid_records_and_a_rerun_submits_nothing(tmp_path, runner_factory):
    captions = [f"two horses in a field number {i}" for i in range(12)] + ["a lone bstuck tree"]
    pool = _pool(tmp_path, captions)
    with FakeChatServer() as server:
        server.script("bstuck@reasoning", "500", "500")
        stage = {
            "stage": "generators.instruct:InstructGenerate",
            "backend": "openai-batch",
            "cache": str(tmp_path / "cache.sqlite"),
            "endpoint": _endpoint(server),
            "batch": {"folder": str(tmp_path / "batches"), "poll_interval": 0.01, "max_rounds": 2},
            "resources": {"batch_size": 20},
        }
        config = {
            "name": "batch",
            "input": str(pool),
            "output_dir": str(tmp_path / "runs"),
            "shard_size": 20,
            "stages": [stage],
        }
        plan, manifest = run_pipeline_dict(config, runner_factory("local"))
        kept = read_phase(plan.run_uri, manifest.final_phase).to_pylist()
        assert len(kept) == len(captions) and read_rejects(plan.run_uri) is None
        for row in kept:
            for record in row["instructions"]:
                assert_llava_record(llava_json(record, f"{row['uid']}.jpg"))
        stuck = next(r for r in kept if "bstuck" in r["caption"])
        assert [r["response_type"] for r in stuck["instructions"]] == ["conversation", "detailed"]
        assert stuck["instruction_failures"][0]["reason"] == REQUEST_FAILED
        jobs = len(server.batches)
        plan, manifest = run_pipeline_dict({**config, "name": "batch-again"}, runner_factory("local"))
        assert len(server.batches) == jobs + 1  # only the request that failed twice is sent again
        again = read_phase(plan.run_uri, manifest.final_phase).to_pylist()
        assert len(next(r for r in again if "bstuck" in r["caption"])["instructions"]) == 3
    assert max(server.answered.values()) == 1
