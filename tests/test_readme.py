"""The README's two set-up commands are what CI runs and what a user pastes: keep them in step."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text[text.index("## Set-up"):text.index("\n## ", text.index("## Set-up") + 1)]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_ci_runs_exactly_the_readme_test_command():
    main_job, tests = _readme_commands()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert tests in ci_lines, "the README's test command is not a line of .ci/run"
    assert "pytest" in tests and "torchrun" in main_job


def test_setup_commands_install_the_locked_versions_in_a_fresh_environment():
    lock = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", lock, re.M), "torch must be pinned without a local label (+cpu)"
    assert "+cpu" not in lock
    for command in _readme_commands():
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
        torch_pin = re.search(r"^torch==(\S+)$", lock, re.M).group(1)
        assert f"torch=={torch_pin}" in command, "the CPU-wheel step must install the locked torch"
        for pip_call in re.findall(r"pip install [^&]+", command):
            assert "-c constraints.txt" in pip_call, pip_call
    for name in ("requirements.txt", "requirements-test.txt", "requirements-nodeps.txt"):
        for line in (ROOT / name).read_text().splitlines():
            req = line.split("#")[0].split(";")[0].strip()
            if req:
                pkg = re.split(r"[<>=!~ \[]", req)[0].lower().replace("_", "-")
                pinned = {l.split("==")[0].lower().replace("_", "-") for l in lock.splitlines() if "==" in l}
                assert pkg in pinned, f"{pkg} ({name}) is not in constraints.txt"
