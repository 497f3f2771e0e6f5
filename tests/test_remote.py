"""Real stage daemons on loopback (tcp with free ports, and ipc): remote equals in-process."""

import json
import subprocess
import sys

import numpy as np
import pytest

from engine.api import local_pipeline
from engine.app.procs import start_stage, stop_stages
from engine.core.errors import UserError
from engine.api import Generator
from engine.compose.planner import StageCapacity, plan_layers
from engine.api import connect_pipeline

PROMPT = "Write a haiku about the sea."
daemon_procs = []  # the module's daemon processes, for tests that look at them
N = 24


@pytest.fixture(scope="module")
def daemons(real_model, tmp_path_factory):
    """Three daemons: mlx on tcp, torch on tcp, torch on ipc."""
    sock = tmp_path_factory.mktemp("ipc") / "torch2.sock"
    procs = []
    try:
        for backend, listen in (("mlx", "tcp://127.0.0.1:0"), ("torch", "tcp://127.0.0.1:0"),
                                ("torch", f"ipc://{sock}")):
            procs.append(start_stage(backend, real_model, listen=listen))
        daemon_procs[:] = [p for p, _ in procs]
        yield [address for _, address in procs]
    finally:
        stop_stages([p for p, _ in procs])


def local_tokens(model_dir, spec):
    gen = Generator(model_dir, local_pipeline(str(model_dir), spec))
    return gen.generate(PROMPT, chat=True, max_tokens=N)


@pytest.mark.parametrize("pair", [(0, 1), (1, 2)], ids=["mlx+torch", "torch+torch(ipc)"])
def test_remote_greedy_equals_local(real_model, daemons, pair):
    a, b = daemons[pair[0]], daemons[pair[1]]
    pipe = connect_pipeline(str(real_model), f"{a}=0-14,{b}=15-29")
    gen = Generator(real_model, pipe)
    remote = gen.generate(PROMPT, chat=True, max_tokens=N)
    spec = "mlx:0-14,torch:15-29" if pair == (0, 1) else "torch:0-14,torch:15-29"
    local = local_tokens(real_model, spec)
    assert remote.token_ids == local.token_ids
    np.testing.assert_allclose([e["logprob"] for e in remote.logprobs], [e["logprob"] for e in local.logprobs],
                               atol=1e-4)
    assert [s.live_sequences() for s in pipe.stages] == [[], []]
    # every stage computed every step; the coordinator saw only tokens
    assert remote.profile["steps"] == len(remote.token_ids)
    assert all(s["compute_ms"] > 0 for s in remote.profile["stages"])
    pipe.close()


def test_prefix_cache_over_daemons_equals_no_cache(real_model, daemons):
    """mlx and torch daemons: shared prefixes arriving together, and a second turn, give the same
    tokens with the prefix cache as without; both daemons hold the blocks the coordinator counts
    (and maybe more: earlier tests' coordinators left theirs, unreferenced, for eviction)."""
    a, b = daemons[0], daemons[1]
    spec = f"{a}=0-14,{b}=15-29"
    outs = []
    for cache in (True, False):
        with Generator(real_model, connect_pipeline(str(real_model), spec), prefix_cache=cache,
                       max_batch_tokens=48) as gen:
            base = gen.tokenizer.encode("Minutes of the harbour board, read aloud at each meeting. " * 12)[:120]
            first = gen.generate(base + [13], max_tokens=8, ignore_eos=True)
            batch = gen.generate_batch([base + first.token_ids] + [base + [i + 20] for i in range(3)],
                                       max_tokens=8, ignore_eos=True)
            outs.append([first.token_ids] + [r.token_ids for r in batch])
            cached = [r.cached_tokens for r in batch]
            if cache:
                assert all(c >= 112 for c in cached), cached
                held = [s.kv_tokens_cached() for s in gen.pipeline.stages]
                assert all(h >= gen.engine.prefix.cached_tokens > 0 for h in held), held
            else:
                assert cached == [0] * 4
            assert [s.live_sequences() for s in gen.pipeline.stages] == [[], []]
    assert outs[0] == outs[1]


def test_planner_splits_by_measured_speed(real_model, daemons):
    logs = []
    pipe = connect_pipeline(str(real_model), f"{daemons[0]},{daemons[1]}", log=logs.append)
    (plan,) = logs
    assert plan.startswith("plan: ") and "predicted" in plan
    ranges = [(s.info.first, s.info.last) for s in pipe.stages]
    assert ranges[0][0] == 0 and ranges[-1][1] == 29 and ranges[0][1] + 1 == ranges[1][0]
    # the ranges are the planner's answer to the speeds and memory the daemons reported
    caps = [StageCapacity(s.address, s.report.ms_per_layer, int(0.8 * s.report.free_memory // s.report.layer_bytes),
                          s.report.head_ms) for s in pipe.stages]
    assert all(c.ms_per_layer > 0 for c in caps) and caps[-1].head_ms > 0
    assert ranges == plan_layers(caps, 30).ranges
    pipe.close()


def test_daemons_run_with_short_spin_waits_and_no_passive_policy(daemons):
    """Co-located daemons take turns on the same cores: each starts (through the `hetpipe` command)
    with thread pools that stop spinning soon after their work, and never with OMP_WAIT_POLICY=PASSIVE,
    which halved a torch stage's decode speed."""
    from engine.app.threads import SPIN_WAITS

    for proc in daemon_procs:
        env = dict(kv.split("=", 1) for kv in open(f"/proc/{proc.pid}/environ").read().split("\0") if "=" in kv)
        assert all(env.get(k) == v for k, v in SPIN_WAITS.items()) and "OMP_WAIT_POLICY" not in env


def test_model_mismatch_is_refused(real_model, daemons, tiny_dirs):
    with pytest.raises(UserError, match="different model"):
        connect_pipeline(str(tiny_dirs["llama"]), f"{daemons[1]}=0-3")


def test_resident_memory_reflects_only_its_layers(real_model, tmp_path):
    infos = {}
    for layers in ("15-29", "25-29"):
        proc, address = start_stage("torch", real_model, extra=["--layers", layers])
        try:
            code = ("import json, sys; from transport.client import Client; from transport import protocol as P; "
                    f"print(json.dumps(Client().call({address!r}, P.PING)['info']))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            infos[layers] = json.loads(out.stdout)
        finally:
            stop_stages([proc])
    layer_bytes = infos["15-29"]["layer_bytes"]
    grew = infos["15-29"]["resident_bytes"] - infos["25-29"]["resident_bytes"]
    # 10 more layers: about 10 layers' worth of resident memory, not the whole model
    assert 0.7 * 10 * layer_bytes < grew < 1.5 * 10 * layer_bytes


def test_coordinator_imports_neither_framework(real_model, daemons):
    code = f"""
import sys
from engine.api import Generator
from engine.compose.planner import StageCapacity, plan_layers
from engine.api import connect_pipeline
pipe = connect_pipeline({str(real_model)!r}, "{daemons[0]}=0-14,{daemons[1]}=15-29")
res = Generator({str(real_model)!r}, pipe).generate("Hi", chat=True, max_tokens=4)
assert len(res.token_ids) >= 1
bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch')]
assert not bad, bad
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cli_generate_over_stages_has_the_same_json(real_model, daemons):
    r = subprocess.run([sys.executable, "-m", "engine.app.cli", "generate", "--model", str(real_model), "--stages",
                        f"{daemons[0]}=0-14,{daemons[1]}=15-29", "--chat", "--max-tokens", "5", "--json", PROMPT],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    local = local_tokens(real_model, "mlx:0-14,torch:15-29")
    assert out["token_ids"] == local.token_ids[:5]
    assert [s["backend"] for s in out["stages"]] == ["mlx", "torch"]


def test_unreachable_stage_is_a_clear_error(real_model):
    r = subprocess.run([sys.executable, "-m", "engine.app.cli", "generate", "--model", str(real_model), "--stages",
                        "tcp://127.0.0.1:1=0-29", "--timeout", "3", "hi"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "did not answer" in r.stderr and "Traceback" not in r.stderr


def test_demo_streams_through_two_daemons_and_stops_them(real_model):
    import os
    import re

    r = subprocess.run([sys.executable, "-m", "engine.app.cli", "demo", "--max-tokens", "12", "Say hello."],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tokens/s decode" in r.stdout and "mlx" in r.stdout and "torch" in r.stdout
    assert "plan: " in r.stderr
    pids = [int(p) for p in re.findall(r"daemon \(pid (\d+)\)", r.stderr)]
    assert len(pids) == 2
    for pid in pids:  # both daemons were stopped (SIGTERM) before the demo returned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
