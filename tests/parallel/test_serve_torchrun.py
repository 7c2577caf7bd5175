"""``dsr1 serve`` and ``dsr1 bench`` launched with several ranks (gloo, CPU): rank 0 serves HTTP and
schedules, rank 1 follows without a socket; SIGTERM to rank 0 stops both; a follower that dies stops
rank 0 with one line; ``torchrun -m dsr1 bench`` writes one JSON with both ranks' figures (issue 17).

Every wait is bounded, every socket is on 127.0.0.1, and at most three launches run (torchrun's start-up
is most of each one's time)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import free_port, write_tokenizer

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
TIMEOUT_S = 20  # parallel.timeout_s of these launches: rank 0 notices a dead follower within it
START_S = 90  # a launch's start-up on a loaded 2-core machine: two interpreters, torch, the model
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def model_dir(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve-tp") / "qwen2"
    shutil.copytree(ckpts["qwen2"], out)
    write_tokenizer(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve-tp-cfg") / "tp2.yaml"
    path.write_text(f"parallel:\n  tensor: 2\n  timeout_s: {TIMEOUT_S}\n")
    return path


class Launch:
    """A process (torchrun, or one rank) whose output is read on a thread; bounded waits for lines."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                     env=env, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the reader's last lines
                break
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} within {timeout} s:\n" + "\n".join(self.lines[-40:]))

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _ranks(launch: Launch) -> dict[int, int]:
    """rank → pid of a launch's worker processes (its process group, read from their environment)."""
    import psutil

    found: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while len(found) < 2 and time.monotonic() < deadline:
        for p in psutil.Process(launch.proc.pid).children(recursive=True) + [psutil.Process(launch.proc.pid)]:
            try:
                env, cmd = p.environ(), " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "RANK" in env and "serve" in cmd and "torch.distributed.run" not in cmd:
                found[int(env["RANK"])] = p.pid
        time.sleep(0.1)
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("DSR1_API_KEY", None)
    return env


def test_torchrun_serve_answers_openai_and_stops_on_sigterm(model_dir: Path, tp2: Path) -> None:
    import httpx
    import openai
    import psutil

    cmd = [*TORCHRUN, "--master-port", str(free_port()), "-m", "dsr1", "serve", "--model", str(model_dir),
           "--config", str(tp2), "--port", "0", "--num-blocks", "64", "--served-model-name", "tiny"]
    launch = Launch(cmd, _env())
    try:
        url = launch.wait_for("listening on http://127.0.0.1:", START_S).split("http://")[1].split(" ")[0]
        port = int(url.rsplit(":", 1)[1])
        deadline = time.monotonic() + START_S
        while httpx.get(f"http://{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, launch.output()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://{url}/v1", api_key="unused", timeout=30, max_retries=0)
        done = client.completions.create(model="tiny", prompt="The Python interpreter", max_tokens=6,
                                         temperature=0)
        assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens >= 1
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A function"}],
                                              max_tokens=5, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        again = client.completions.create(model="tiny", prompt="The Python interpreter", max_tokens=6, temperature=0)
        assert again.choices[0].text == done.choices[0].text  # greedy: the same text through the two ranks

        ranks = _ranks(launch)
        assert sorted(ranks) == [0, 1], launch.output()
        listening = {r: {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN} for r, pid in ranks.items()}
        # rank 0: gloo's listener and the HTTP port; rank 1: gloo's listener alone
        assert port in listening[0] and port not in listening[1], listening
        assert len(listening[1]) == len(listening[0]) - 1, listening

        os.kill(ranks[0], signal.SIGTERM)  # rank 0 drains, then stops the follower
        assert launch.proc.wait(60) == 0, launch.output()
        assert "dsr1 serve: stopped" in launch.output() and "Traceback" not in launch.output(), launch.output()
    finally:
        launch.kill()


def test_dead_follower_stops_rank0_with_one_line(model_dir: Path, tp2: Path) -> None:
    """Two ranks started as torchrun would (its environment, without its supervision, as on two hosts)."""
    port = free_port()
    launches = []
    for rank in (0, 1):
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        launches.append(Launch([sys.executable, "-m", "dsr1", "serve", "--model", str(model_dir), "--config",
                                str(tp2), "--port", "0", "--num-blocks", "64"], env))
    lead, follower = launches
    try:
        url = lead.wait_for("listening on http://127.0.0.1:", START_S).split("http://")[1].split(" ")[0]
        import httpx

        deadline = time.monotonic() + START_S
        while httpx.get(f"http://{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, lead.output()
            time.sleep(0.2)
        follower.kill()
        killed = time.monotonic()
        assert lead.proc.wait(TIMEOUT_S + 15) == 2, lead.output()
        assert time.monotonic() - killed < TIMEOUT_S + 5
        errors = [line for line in lead.lines if line.startswith("dsr1: error")]
        assert len(errors) == 1 and "rank 0 of 2" in errors[0] and "parallel.timeout_s" in errors[0], lead.output()
        assert "Traceback" not in lead.output()
    finally:
        for launch in launches:
            launch.kill()


def test_torchrun_bench_reports_every_rank(model_dir: Path, tp2: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [*TORCHRUN, "--master-port", str(free_port()), "-m", "dsr1", "bench", "--model", str(model_dir),
           "--config", str(tp2), "--batch-size", "2", "--prompt-len", "4", "--new-tokens", "3", "--reps", "1",
           "--threads", "1", "--quiet", "--output", str(out)]
    launch = Launch(cmd, _env())
    try:
        assert launch.proc.wait(START_S) == 0, launch.output()
    finally:
        launch.kill()
    report = json.loads(out.read_text())
    par = report["parallel"]
    assert (par["world_size"], par["tensor"], par.get("pipeline", 1)) == (2, 2, 1)
    assert report["command"].startswith("torchrun --nproc-per-node 2 -m dsr1 bench ")
    assert [r["rank"] for r in par["ranks"]] == [0, 1]
    for r in par["ranks"]:
        assert list(r["peak_mem_mb"]) == ["2"] and all(v > 0 for v in r["decode_tok_s"].values())
        assert 0.5 <= r["weight_bytes"] / par["totals"]["weight_bytes"] < 0.53  # its half, norms whole on both
    assert par["totals"]["weight_bytes"] == sum(r["weight_bytes"] for r in par["ranks"])
    assert [row["batch_size"] for row in report["results"]] == [2]


@pytest.mark.parametrize("given", [None, "7"])
def test_parallel_bench_config_keeps_the_callers_nccl_settings(given: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCCL_")}
    if given is not None:
        env["NCCL_NVLS_ENABLE"] = given
    # gpu.sh's step() stands in: print the variable the benchmark would run with
    script = 'step() { echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"; }; OUT=/nonexistent; . bench/configs/parallel.sh 2'
    got = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, env=env, timeout=30)
    assert got.stdout.strip() == f"NCCL_NVLS_ENABLE={given or '0'}", got
