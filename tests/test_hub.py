"""Hub ids: the real `huggingface_hub` client against a stand-in Hub on loopback (`hub_server.py`,
through HF_ENDPOINT), serving a tiny checkpoint transformers saved with one shard per layer or so.
A coordinator fetches no weights; each stage fetches the files of its own layers and gives the
tokens the local directory gives; a cut download resumes; the cache serves offline; a missing or
gated repo is one line and exit code 2; two daemons started with the Hub id hold their own files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.api import Generator, local_pipeline
from engine.compose import hub
from engine.app.fetch import resolve_model
from engine.app.procs import start_stage, stop_stages
from engine.compose.stages import load_stage
from engine.core.config import ModelConfig
from hub_server import HubServer

REPO = "tiny/llama"


@pytest.fixture(scope="module")
def served(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    shutil.copytree(tiny_dirs["sharded"], root / REPO)
    shutil.copytree(tiny_dirs["sharded"], root / "tiny/gated")
    (root / "tiny/gated/.gated").write_text("")
    server = HubServer(root)
    yield server, tmp_path_factory.mktemp("hf-home")
    server.close()


@pytest.fixture()
def env(served, monkeypatch):
    server, home = served
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    return server


def weight_files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.name.endswith(".safetensors") and p.exists()}


def test_a_coordinator_fetches_no_weights_and_each_stage_its_own(env, tiny_dirs):
    d = resolve_model(REPO)
    assert hub.source_of(d) == (REPO, env.commit(REPO))
    assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file() and weight_files(d) == set()
    cfg = ModelConfig.load(d)
    shards = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) >= 4  # the checkpoint is spread over several files
    before = env.files_sent(REPO)
    first = load_stage("torch", d, 0, 1)
    fetched_first = env.files_sent(REPO) - before
    assert fetched_first == set(hub.stage_files(d, cfg, 0, 1)) and weight_files(d) == fetched_first
    second = load_stage("torch", d, 2, 3)
    assert weight_files(d) == fetched_first | set(hub.stage_files(d, cfg, 2, 3))
    assert set(hub.stage_files(d, cfg, 0, 1)) != set(hub.stage_files(d, cfg, 2, 3))
    first.close(), second.close()
    sent = sum(env.sent.values())
    with Generator(d, local_pipeline(d, "torch:0-1,torch:2-3")) as gen:  # fetched already: nothing more
        got = gen.generate([1, 5, 9, 14], max_tokens=8, ignore_eos=True).token_ids
    assert sum(env.sent.values()) == sent
    with Generator(tiny_dirs["sharded"], local_pipeline(tiny_dirs["sharded"], "torch:0-1,torch:2-3")) as gen:
        assert got == gen.generate([1, 5, 9, 14], max_tokens=8, ignore_eos=True).token_ids


def test_a_killed_fetch_keeps_what_it_completed(served, tmp_path):
    """A `hetpipe fetch` killed mid-way keeps the files it completed: the next one fetches the rest
    only. (huggingface_hub 2.x restarts a file cut short in another process: each process downloads
    into a file of its own; within one process a cut connection is retried.)"""
    server, _ = served
    home = tmp_path / "home"
    r = run_cli(["fetch", REPO, "--layers", "0-0"], home, server.url)
    assert r.returncode == 0, r.stderr
    d = Path(r.stdout.strip())
    cfg = ModelConfig.load(d)
    files = [f for f in hub.stage_files(d, cfg, 1, 3) if not (d / f).exists()]
    slow = f"{REPO}/{files[-1]}"
    size = (server.root / slow).stat().st_size
    server.slow[slow] = size / 8  # eight seconds for that one
    before = dict(server.sent)
    env = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": server.url}
    proc = subprocess.Popen([sys.executable, "-m", "engine.app.cli", "fetch", REPO, "--layers", "1-3"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = [f for f in files[:-1]]
    deadline = time.monotonic() + 60
    while not (all((d / f).exists() for f in done) and server.sent[slow] > before.get(slow, 0)):
        assert time.monotonic() < deadline, "the fetch did not get going"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    server.slow.pop(slow)
    assert not (d / files[-1]).exists()
    kept = {f: server.sent[f"{REPO}/{f}"] for f in done}
    r = run_cli(["fetch", REPO, "--layers", "1-3"], home, server.url)
    assert r.returncode == 0, r.stderr
    assert {f: server.sent[f"{REPO}/{f}"] for f in done} == kept  # not fetched again
    assert (d / files[-1]).read_bytes() == (server.root / slow).read_bytes()


def run_cli(args, home, endpoint, **extra_env):
    env = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": endpoint, **extra_env}
    return subprocess.run([sys.executable, "-m", "engine.app.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_missing_and_gated_repos_say_so_in_one_line(served):
    server, home = served
    for repo, why in (("nobody/nothing", "no model 'nobody/nothing'"), ("tiny/gated", "gated")):
        r = run_cli(["generate", "--model", repo, "--local", "torch", "--prompt-ids", "1,2", "--max-tokens", "2"],
                    home, server.url)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_cache_serves_offline(served, env):
    server, home = served
    d = resolve_model(REPO)
    hub.ensure_layers(d, 0, 3)
    sent = sum(server.sent.values())
    r = run_cli(["generate", "--model", REPO, "--local", "torch:0-1,torch:2-3", "--prompt-ids", "1,5,9",
                 "--max-tokens", "4", "--ignore-eos", "--json"], home, "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 4 and sum(server.sent.values()) == sent


def test_daemons_started_with_the_hub_id_hold_their_own_files(served, tiny_dirs, tmp_path):
    """Two daemons (two machines: caches of their own) take `--model ORG/NAME`; the coordinator's
    split decides which files each fetches, and they give the local directory's tokens."""
    server, _ = served
    homes = [tmp_path / "mac", tmp_path / "linux"]
    procs = []
    try:
        addresses = []
        for home in homes:
            proc, address = start_stage("torch", REPO, env={**os.environ, "HF_HOME": str(home),
                                                              "HF_ENDPOINT": server.url})
            procs.append(proc)
            addresses.append(address)
        coordinator = tmp_path / "coordinator"
        r = run_cli(["generate", "--model", REPO, "--stages", f"{addresses[0]}=0-1,{addresses[1]}=2-3",
                     "--prompt-ids", "1,5,9,14", "--max-tokens", "8", "--ignore-eos", "--json"], coordinator, server.url)
        assert r.returncode == 0, r.stderr
        with Generator(tiny_dirs["sharded"], local_pipeline(tiny_dirs["sharded"], "torch")) as gen:
            assert json.loads(r.stdout)["token_ids"] == gen.generate([1, 5, 9, 14], max_tokens=8,
                                                                     ignore_eos=True).token_ids
        cfg = ModelConfig.load(tiny_dirs["sharded"])
        for home, (a, b) in zip(homes, [(0, 1), (2, 3)]):
            snapshot = next(home.glob("hub/models--tiny--llama/snapshots/*"))
            assert weight_files(snapshot) == set(hub.stage_files(snapshot, cfg, a, b))
        assert not list(coordinator.glob("hub/models--tiny--llama/snapshots/*/*.safetensors"))
    finally:
        stop_stages(procs)
