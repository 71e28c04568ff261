"""data/judge.py against a real HTTP server on 127.0.0.1 (tests/judge_server.py in a subprocess): normal replies,
slow replies past the timeout, 429/500 then success, malformed replies, a refused request, a bad key, and a
server killed mid-run followed by a rerun (requests counted on the server side). No traffic leaves 127.0.0.1."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.judge import JudgeUnavailable, ServerJudge
from data.prepare import main, prepare

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"name": "f", "description": "F.", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer", "description": "X."}}, "required": ["x"]}}]


def write_records(path: Path, n: int, extra: dict | None = None) -> Path:
    """n valid records (ids r0..), plus {id: user text} extras (UNSOLVABLE / TOOLONG trigger the server)."""
    with open(path, "w") as f:
        texts = {f"r{i}": f"please call f with x={i}" for i in range(n)} | (extra or {})
        for i, (rid, text) in enumerate(texts.items()):
            f.write(json.dumps({"id": rid, "messages": [{"role": "user", "content": text}], "tools": TOOLS,
                                "answers": [{"name": "f", "arguments": {"x": i}}], "category": "simple"}) + "\n")
    return path


@pytest.fixture
def server(tmp_path):
    """start(*args) -> (url, log path); every server started is killed at the end."""
    procs = []

    def start(*args):
        log = tmp_path / f"server{len(procs)}.log"
        log.touch()
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "judge_server.py"), "--log", str(log), *args],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        return f"http://127.0.0.1:{int(line.split()[1])}/v1", log

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def events(log: Path, kind: str) -> list[str]:
    return [e["key"] for e in map(json.loads, log.read_text().splitlines()) if e["event"] == kind]


def outputs(out: Path) -> dict:
    """id -> file name, asserting that no id appears twice."""
    where = {}
    for name in ("train.jsonl", "val.jsonl", "rejects.jsonl"):
        path = out / name
        for line in path.read_text().splitlines() if path.is_file() else []:
            rid = json.loads(line)["id"]
            assert rid not in where, f"{rid} written twice"
            where[rid] = name
    return where


def judge(url, tmp_path, **kw):
    kw = {"concurrency": 4, "timeout": 5.0, "retries": 3, "backoff": 0.01, "cache_path": tmp_path / "cache.jsonl",
          **kw}
    return ServerJudge(url, "judge-m", **kw)


def test_normal_replies_each_record_asked_once_and_a_rerun_asks_nothing(server, tmp_path):
    url, log = server()
    data = write_records(tmp_path / "in.jsonl", 10, {"bad": "UNSOLVABLE request"})
    j = judge(url, tmp_path)
    prepare([data], tmp_path / "out", judge=j, batch_size=8, progress=False)
    where = outputs(tmp_path / "out")
    assert len(where) == 11 and where["bad"] == "rejects.jsonl"
    assert sum(v != "rejects.jsonl" for v in where.values()) == 10
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["reason"] == "judge:unsolvable"
    asked = events(log, "request")
    assert len(asked) == 11 and len(set(asked)) == 11  # one request per record
    entries = [json.loads(line) for line in log.read_text().splitlines() if '"request"' in line]
    assert {e["path"] for e in entries} == {"/v1/chat/completions"} and {e["model"] for e in entries} == {"judge-m"}
    # the same records again into a fresh directory, same cache: the server is not asked again
    j2 = judge(url, tmp_path)
    prepare([data], tmp_path / "out2", judge=j2, batch_size=8, progress=False)
    assert len(events(log, "request")) == 11
    assert j2.counters.cached == 11 and j2.counters.requests == 0
    assert outputs(tmp_path / "out2") == where


def test_slow_replies_past_the_timeout_are_retried(server, tmp_path):
    url, log = server("--first", "slow", "--slow", "4")
    data = write_records(tmp_path / "in.jsonl", 6)
    j = judge(url, tmp_path, timeout=1.5)
    t0 = time.time()
    prepare([data], tmp_path / "out", judge=j, batch_size=8, progress=False)
    assert time.time() - t0 < 15  # the 4 s replies were not waited for
    assert set(outputs(tmp_path / "out").values()) <= {"train.jsonl", "val.jsonl"}
    asked = events(log, "request")
    assert len(asked) == 12 and all(asked.count(k) == 2 for k in asked)  # timed out once, then answered
    assert j.counters.retries == 6


@pytest.mark.parametrize("first", ["429", "500", "malformed"])
def test_429_5xx_and_malformed_replies_then_success(server, tmp_path, first):
    url, log = server("--first", first)
    data = write_records(tmp_path / "in.jsonl", 6)
    j = judge(url, tmp_path)
    prepare([data], tmp_path / "out", judge=j, batch_size=8, progress=False)
    where = outputs(tmp_path / "out")
    assert len(where) == 6 and "rejects.jsonl" not in where.values()
    asked = events(log, "request")
    assert len(asked) == 12 and len(set(asked)) == 6
    assert j.counters.retries == 6


def test_always_malformed_stops_with_a_clear_error_and_loses_nothing(server, tmp_path):
    url, log = server("--always", "malformed")
    data = write_records(tmp_path / "in.jsonl", 5)
    with pytest.raises(JudgeUnavailable, match="malformed reply"):
        prepare([data], tmp_path / "out", judge=judge(url, tmp_path, retries=2), batch_size=8, progress=False)
    assert outputs(tmp_path / "out") == {}  # nothing rejected for a server fault
    assert len(events(log, "request")) == 5 * 3  # bounded: 1 + 2 retries each


def test_a_refused_request_rejects_only_its_record(server, tmp_path):
    url, _ = server()
    data = write_records(tmp_path / "in.jsonl", 4, {"long": "TOOLONG " * 5})
    prepare([data], tmp_path / "out", judge=judge(url, tmp_path), batch_size=8, progress=False)
    where = outputs(tmp_path / "out")
    assert where["long"] == "rejects.jsonl" and sum(v == "rejects.jsonl" for v in where.values()) == 1
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert "HTTP 400" in reject["detail"] and "longer than the context" in reject["detail"]


def test_cli_sends_the_key_from_the_environment_and_writes_it_nowhere(server, tmp_path, monkeypatch, capsys):
    secret = "sk-test-7d1c0ffee"
    url, log = server("--expect-key", secret)
    monkeypatch.setenv("FUNRL_TEST_JUDGE_KEY", secret)
    data = write_records(tmp_path / "in.jsonl", 5)
    main(["--input", str(data), "--out", str(tmp_path / "out"), "--judge-url", url, "--judge-model", "judge-m",
          "--judge-api-key-env", "FUNRL_TEST_JUDGE_KEY", "--judge-concurrency", "2"])
    entries = [json.loads(line) for line in log.read_text().splitlines() if '"request"' in line]
    assert len(entries) == 5 and all(e["auth_ok"] for e in entries)  # the key was sent
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    for path in (tmp_path / "out").iterdir():
        assert secret not in path.read_text(), path.name
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["judge_model"] == "judge-m" and run["judge_server"] is True
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["this_run"]["judge_server"]["requests"] == 5


def test_a_bad_key_stops_at_once(server, tmp_path):
    url, log = server("--always", "401")
    data = write_records(tmp_path / "in.jsonl", 20)
    with pytest.raises(JudgeUnavailable, match="API key"):
        prepare([data], tmp_path / "out", judge=judge(url, tmp_path, concurrency=2), batch_size=20, progress=False)
    assert len(events(log, "request")) <= 2  # the requests in flight; the rest were never sent


def test_device_is_refused_with_a_url(tmp_path, capsys):
    data = write_records(tmp_path / "in.jsonl", 1)
    with pytest.raises(SystemExit) as e:
        main(["--input", str(data), "--out", str(tmp_path / "out"), "--judge-url", "http://127.0.0.1:9/v1",
              "--judge-model", "m", "--device", "cuda"])
    assert e.value.code == 2 and "--device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_server_killed_mid_run_then_rerun_loses_nothing_and_repays_nothing(server, tmp_path, capsys):
    data = write_records(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out"
    url1, log1 = server("--die-after", "13")
    args = ["--input", str(data), "--out", str(out), "--judge-model", "judge-m", "--judge-concurrency", "4",
            "--judge-batch", "8", "--judge-retries", "1", "--judge-timeout", "5"]
    with pytest.raises(SystemExit) as e:
        main(args + ["--judge-url", url1])
    assert "rerun the same command" in str(e.value.code)
    answered = set(events(log1, "reply"))
    assert len(answered) == 13
    written = outputs(out)
    assert 8 <= len(written) < 40  # the first batch was written, the rest was not
    # a fresh server (another port): the rerun resumes
    url2, log2 = server()
    main(args + ["--judge-url", url2])
    where = outputs(out)
    assert sorted(where) == sorted(f"r{i}" for i in range(40)) and "rejects.jsonl" not in where.values()
    asked_again = events(log2, "request")
    assert not answered & set(asked_again)  # no reply received before was paid for twice
    assert len(asked_again) == len(set(asked_again)) == 40 - len(answered)


def test_loopback_server_is_reached_directly_even_with_a_proxy_set(server, tmp_path, monkeypatch):
    url, log = server()
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there: a proxied request would fail
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    data = write_records(tmp_path / "in.jsonl", 2)
    prepare([data], tmp_path / "out", judge=judge(url, tmp_path, retries=0), batch_size=8, progress=False)
    assert len(events(log, "request")) == 2


def test_redirects_are_not_followed(server, tmp_path, monkeypatch):
    url, log = server("--always", "302")
    monkeypatch.setenv("FUNRL_TEST_JUDGE_KEY", "sk-never-moves")
    data = write_records(tmp_path / "in.jsonl", 3)
    with pytest.raises(JudgeUnavailable, match="redirects"):
        prepare([data], tmp_path / "out", progress=False, batch_size=8,
                judge=judge(url, tmp_path, concurrency=1, api_key_env="FUNRL_TEST_JUDGE_KEY"))
    paths = [json.loads(line)["path"] for line in log.read_text().splitlines()]
    assert paths == ["/v1/chat/completions"]  # one request, never re-sent to the Location


def test_a_half_written_cache_line_is_dropped_and_the_cache_stays_valid(server, tmp_path):
    url, log = server()
    cache = tmp_path / "cache.jsonl"
    first = judge(url, tmp_path)
    prompts = [[{"role": "user", "content": f"please call f with x={i}"}] for i in range(3)]
    replies = first(prompts[:2])
    cache.write_bytes(cache.read_bytes() + b'{"key": "abc", "rep')  # the process died mid-write
    second = judge(url, tmp_path)
    assert second(prompts) == replies + [replies[0]]  # the server answers every prompt the same way
    assert len(events(log, "request")) == 3  # only the third prompt was sent again
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["reply"] for line in lines)
