"""eval.bench's step-vs-TRL comparison: both sides run and count the same steps (hence the same prompts)."""
import json
import subprocess
import sys
import types

from eval import bench


def test_step_and_trl_count_the_same_steps_by_default(monkeypatch):
    steps_asked = {}

    def fake_train(args, out_dir):
        n = int(args[args.index("--steps") + 1])
        steps_asked["step"] = n
        return [{"phase": "rl", "time_step": 10.0 + i, "time_sample": 1.0, "time_score": 1.0, "time_update": 1.0,
                 "resp_len_mean": 50.0 + i, "peak_mem_gb": 1.0, "mem_gb": 1.0} for i in range(n)]

    def fake_run(cmd, **_):
        n = int(cmd[cmd.index("--steps") + 1])
        steps_asked["trl"] = n
        worker = {"step_seconds": [30.0 + i for i in range(n)], "resp_len_mean": [40.0 + i for i in range(n)],
                  "trl": "0"}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(worker) + "\n")

    monkeypatch.setattr(bench, "_train_subprocess", fake_train)
    monkeypatch.setattr(subprocess, "run", fake_run)
    for name in ("trl", "datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    step, trl = bench.bench_step([]), bench.bench_trl([])
    assert steps_asked["step"] == steps_asked["trl"] == bench.STEP_SETTINGS["steps"] >= 2
    assert step["steps_counted"] == trl["steps_counted"] == steps_asked["step"] - 1
    # per counted step, the first step left out on both sides
    assert step["sec_each_step"] == [11.0 + i for i in range(step["steps_counted"])]
    assert trl["resp_len_each_step"] == [41.0 + i for i in range(trl["steps_counted"])]
