"""The CLI contract: JSON keys, streaming, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from engine.compose.specs import parse_local_spec
from engine.core.partition import even_split
from engine.core.errors import UserError

HETPIPE = [sys.executable, "-m", "engine.app.cli"]


def run(*args, timeout=180):
    return subprocess.run([*HETPIPE, *args], capture_output=True, text=True, timeout=timeout)


def test_json_output_has_the_contract_keys(real_model):
    r = run("generate", "--model", str(real_model), "--local", "mlx:0-9,torch:10-29", "--chat",
            "--max-tokens", "6", "--logprobs", "3", "--json", "Name a colour.")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    out = json.loads(line)
    assert set(out) >= {"text", "prompt_token_ids", "token_ids", "logprobs", "finish_reason", "ttft_ms",
                        "decode_tokens_per_s", "stages"}
    assert len(out["logprobs"]) == len(out["token_ids"]) and out["finish_reason"] in ("stop", "length")
    assert all(len(e["top"]) == 3 and e["top"][0]["logprob"] >= e["logprob"] - 1e-9 for e in out["logprobs"])
    assert [s["backend"] for s in out["stages"]] == ["mlx", "torch"]
    assert [s["layers"] for s in out["stages"]] == [[0, 9], [10, 29]]


def test_streams_text(real_model):
    r = run("generate", "--model", str(real_model), "--local", "torch", "--max-tokens", "8", "The sky is")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0 and "tokens/s" in r.stderr


def test_a_local_mlx_stage_exits_cleanly(real_model):
    """The compute thread runs MLX's compiled MLP; a thread whose MLX compile cache is destroyed while
    Python finalizes aborts the process ("terminate called", 2 runs of 5 before the stage dropped its
    compiled graphs on close)."""
    for _ in range(4):  # a race at exit
        r = run("generate", "--model", str(real_model), "--local", "mlx", "--max-tokens", "3", "Hi")
        assert r.returncode == 0 and "terminate called" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--local", "torch:0-14,mlx:14-29"], "overlap"),
    (["--local", "torch:0-10,mlx:12-29"], "gap"),
    (["--local", "torch:0-31"], "past"),
    (["--local", "tpu"], "unknown backend"),
    (["--local", "torch", "--dtype", "fp8"], "unknown dtype"),
    (["--local", "torch", "--top-p", "3"], "top-p"),
    (["--local", "torch", "--max-tokens", "0"], "max tokens"),
])
def test_bad_input_is_one_line_and_exit_2(real_model, args, message):
    r = run("generate", "--model", str(real_model), *args, "hello")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert message in r.stderr


def test_missing_model_and_unsupported_model(tmp_path):
    r = run("generate", "--model", str(tmp_path / "nope"), "--local", "torch", "hi")
    assert r.returncode == 2 and "no model" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    r = run("generate", "--model", str(tmp_path), "--local", "torch", "hi")
    assert r.returncode == 2 and "unsupported model_type" in r.stderr


def test_prompt_longer_than_context(real_model):
    r = run("generate", "--model", str(real_model), "--local", "torch", "word " * 9000)
    assert r.returncode == 2 and "context" in r.stderr and "Traceback" not in r.stderr


def test_bad_gguf_and_unknown_fetch(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    r = run("import-gguf", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a readable GGUF" in r.stderr
    r = run("fetch", "nosuchmodel")
    assert r.returncode == 2 and "unknown model" in r.stderr


def test_specs_and_even_split():
    assert even_split(30, 2) == [(0, 14), (15, 29)]
    assert even_split(30, 4) == [(0, 7), (8, 15), (16, 22), (23, 29)]
    specs = parse_local_spec("mlx,torch", 30)
    assert [(s.backend, s.first, s.last) for s in specs] == [("mlx", 0, 14), ("torch", 15, 29)]
    with pytest.raises(UserError, match="every stage or for none"):
        parse_local_spec("mlx:0-14,torch", 30)
    with pytest.raises(UserError, match="not assigned"):
        parse_local_spec("mlx:0-14", 30)


def test_prompt_ids_and_ignore_eos_on_a_moe_model(tiny_dirs, tmp_path):
    """Raw token ids in, split across both backends; EOS (here the first greedy token) ends the request
    unless --ignore-eos, which runs it to --max-tokens: tokens equal transformers' either way."""
    import shutil

    from reference import hf_greedy, hf_model

    d = tmp_path / "moe"
    shutil.copytree(tiny_dirs["qwen3_moe"], d)
    ids = [5, 17, 33, 9, 100, 7]
    want, _ = hf_greedy(hf_model(d), ids, 10)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": want[0]}))
    base = ["generate", "--model", str(d), "--local", "mlx:0-1,torch:2-3", "--max-tokens", "10", "--json",
            "--prompt-ids", ",".join(map(str, ids))]
    stopped, ignored = (json.loads(run(*base, *extra).stdout) for extra in ([], ["--ignore-eos"]))
    assert stopped["prompt_token_ids"] == ids and stopped["finish_reason"] == "stop"
    assert stopped["token_ids"] == want[:1]  # the EOS token is reported, its text is not
    assert ignored["token_ids"] == want and ignored["finish_reason"] == "length"


@pytest.mark.parametrize("args,message", [
    (["hello", "--prompt-ids", "1,2"], "one of the two"),
    ([], "one of the two"),
    (["--prompt-ids", "1,x"], "integers"),
    (["--prompt-ids", "1,2", "--chat"], "--chat"),
    (["--prompt-ids", "1,999999"], "token ids must be in"),
])
def test_bad_prompt_ids_are_one_line_and_exit_2(real_model, args, message):
    r = run("generate", "--model", str(real_model), "--local", "torch", *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
