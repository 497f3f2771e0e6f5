"""`hetpipe selftest`: does this machine compute what transformers computes? One line per check.

For every backend importable here and every device it has (torch: cpu, and cuda or mps where
present; MLX: cpu, and Metal where present), in the dtype `--dtype auto` picks there:
- a tiny llama written here from a fixed seed, and the fetched SmolLM2 when it is fetched: greedy
  tokens and their log-probabilities with the KV cache (decode steps), without it (each position
  prefilled afresh), and two prompts in one batch, against transformers when it is installed,
  else against the reference shipped in `selftest_reference.json` (written by transformers);
- the quantized kernels: the tiny model at 4 and 8 bits against the same weights dequantized;
- one round trip through a stage daemon on loopback;
- decode speed on the largest model present against the device's read-bandwidth floor (a figure,
  not a check).
Exit code 1 when any check fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.sampling import SamplingParams

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
PROMPTS = {"tiny": [[5, 17, 33, 9, 100, 7], [3, 250, 64, 12, 8, 200, 41, 19]],
           "smollm2": [[1, 9690, 314, 253, 1345, 28], [504, 3609, 282, 4103, 314]]}
TOKENS = 8
TOLERANCE = {"float32": 2e-3, "float16": 0.1, "bfloat16": 0.15}  # on a log-probability
REFERENCE = "selftest_reference.json"


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


# -- the models ---------------------------------------------------------------------------------------

def write_tiny(out: Path, seed: int = 0) -> Path:
    """A tiny llama (4 layers, a byte vocabulary) whose weights come from `seed`, as safetensors."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, i, v, n = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"], TINY["num_hidden_layers"]
    kv = TINY["num_key_value_heads"] * h // TINY["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(n):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    tensors = {name: (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
                      else 0.3 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in sorted(shapes.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**TINY, "architectures": ["LlamaForCausalLM"]}))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: k for k, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": alphabet[2]}))
    return out


def reference(name: str, model_dir: Path, dtype: str) -> tuple[list[dict], str]:
    """(per prompt: tokens and logprobs, where they come from): transformers live where installed,
    else the stored reference (float32; compared within the tolerance of `dtype`)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        stored = json.loads(resources.files(__package__).joinpath(REFERENCE).read_text())
        if name not in stored:
            raise UserError(f"no stored reference for {name} and transformers is not installed") from None
        return stored[name], "the stored reference"
    from backends.torch_stage.reference import transformers_reference

    return transformers_reference(model_dir, PROMPTS[name], TOKENS, "float32"), "transformers"


# -- running a stage ----------------------------------------------------------------------------------

def _run(stage, seqs: list[tuple[int, int, list[int]]]) -> dict[int, tuple[int, float]]:
    """One forward of (seq id, offset, new tokens) chunks, each sampling greedily: id -> (token, logprob)."""
    from ..core.stage import SeqChunk, StageBatch

    batch = StageBatch([SeqChunk(s, off, np.asarray(toks, np.int32), SamplingParams()) for s, off, toks in seqs])
    return {t.seq_id: (t.token_id, t.logprob) for t in stage.forward(batch).tokens}


def decode(stage, prompts: list[list[int]], ids: list[int]) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens with the KV cache, the prompts together (one batch per step)."""
    got = _run(stage, [(s, 0, p) for s, p in zip(ids, prompts)])
    out = {s: ([got[s][0]], [got[s][1]]) for s in ids}
    for step in range(1, TOKENS):
        got = _run(stage, [(s, len(p) + step - 1, [out[s][0][-1]]) for s, p in zip(ids, prompts)])
        for s in ids:
            out[s][0].append(got[s][0])
            out[s][1].append(got[s][1])
    stage.release(ids)
    return [out[s] for s in ids]


def no_cache(stage, prompt: list[int], tokens: list[int], base: int) -> tuple[list[int], list[float]]:
    """Each position prefilled afresh from the reference's tokens before it (no cached key or value)."""
    toks, lps = [], []
    for k in range(TOKENS):
        t, lp = _run(stage, [(base + k, 0, prompt + tokens[:k])])[base + k]
        stage.release([base + k])
        toks.append(t)
        lps.append(lp)
    return toks, lps


def compare(got: tuple[list[int], list[float]], want: dict, tol: float) -> tuple[bool, str]:
    toks, lps = got
    if toks != want["tokens"]:
        k = next(i for i, (a, b) in enumerate(zip(toks, want["tokens"])) if a != b)
        return False, f"token {k} is {toks[k]}, the reference's {want['tokens'][k]}"
    err = max(abs(a - b) for a, b in zip(lps, want["logprobs"]))
    return err <= tol, f"{len(toks)} tokens equal, log-probabilities within {err:.1e} (tolerance {tol:g})"


def check_model(backend: str, device: str, name: str, model_dir: Path, log) -> list[Check]:
    from ..compose.stages import load_stage

    stage = load_stage(backend, model_dir, 0, _layers(model_dir) - 1, device=device)
    try:
        dtype = stage.info.dtype
        refs, source = reference(name, model_dir, dtype)
        tol, where = TOLERANCE[dtype], f"{backend} {device} {dtype} {name}"
        out = []
        together = decode(stage, PROMPTS[name], [101, 102])
        for mode, got in (("with cache", together[0]), ("in a batch", together[1])):
            ok, detail = compare(got, refs[0] if mode == "with cache" else refs[1], tol)
            out.append(Check(f"{where} {mode}", ok, f"{detail} against {source}"))
        ok, detail = compare(no_cache(stage, PROMPTS[name][0], refs[0]["tokens"], 200), refs[0], tol)
        out.append(Check(f"{where} without cache", ok, f"{detail} against {source}"))
        for c in out:
            log(c.line())
        return out
    finally:
        stage.close()


def check_quantized(backend: str, device: str, tiny: Path, work: Path, log) -> list[Check]:
    """The quantized kernels against the same weights dequantized (float32, greedy, logprobs)."""
    from .quantize import dequantize_dir, quantize_dir
    from ..compose.stages import load_stage

    out = []
    for bits in (4, 8):
        q = quantize_dir(tiny, work / f"q{bits}", bits, 32, progress=False)
        d = dequantize_dir(q, work / f"q{bits}-float")
        got = []
        for path in (q, d):
            stage = load_stage(backend, path, 0, _layers(path) - 1, device=device, dtype="float32")
            try:
                got.append(decode(stage, PROMPTS["tiny"][:1], [301])[0])
            finally:
                stage.close()
        ok, detail = compare(got[0], {"tokens": got[1][0], "logprobs": got[1][1]}, 1e-3)
        out.append(Check(f"{backend} {device} {bits}-bit kernels", ok, f"{detail} against the dequantized weights"))
        log(out[-1].line())
    return out


def check_daemon(backend: str, tiny: Path, log) -> Check:
    """A stage daemon on loopback computes what the in-process stage computes."""
    from ..api import Generator, connect_pipeline, local_pipeline
    from .procs import start_stage, stop_stages

    with Generator(tiny, local_pipeline(tiny, backend)) as gen:
        want = gen.generate(PROMPTS["tiny"][0], max_tokens=TOKENS, ignore_eos=True).token_ids
    proc, address = start_stage(backend, tiny, extra=["--layers", f"0-{_layers(tiny) - 1}"])
    try:
        with Generator(tiny, connect_pipeline(tiny, address, log=lambda m: None)) as gen:
            got = gen.generate(PROMPTS["tiny"][0], max_tokens=TOKENS, ignore_eos=True).token_ids
    finally:
        stop_stages([proc])
    c = Check(f"{backend} daemon round trip", got == want, f"{len(got)} tokens over ZeroMQ "
              f"{'equal' if got == want else 'differ from'} the in-process stage's")
    log(c.line())
    return c


def decode_speed(backend: str, device: str, model_dir: Path) -> str:
    """Decode tokens/s of one stream against the floor the device's read bandwidth sets."""
    from ..core.config import ModelConfig
    from .bench.backends import decode_weight_bytes
    from ..compose.stages import load_stage

    cfg = ModelConfig.load(model_dir)
    stage = load_stage(backend, model_dir, 0, cfg.num_hidden_layers - 1, device=device)
    try:
        prompt = list(range(10, 42))
        _run(stage, [(1, 0, prompt)])
        t = time.perf_counter()
        for i in range(32):
            _run(stage, [(1, len(prompt) + i, [7])])
        tps = 32 / (time.perf_counter() - t)
        bw = stage.read_bandwidth()
        floor_tps = bw / decode_weight_bytes(cfg, 0, cfg.num_hidden_layers - 1, stage.info.dtype) if bw else 0
        floor = f", {tps / floor_tps:.0%} of the {bw / 1e9:.1f} GB/s read-bandwidth floor" if bw else ""
        return f"     {backend} {device} {stage.info.dtype} {Path(model_dir).name}: {tps:.1f} tokens/s decode{floor}"
    finally:
        stage.close()


def _layers(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]


def devices(backend: str) -> list[str]:
    """The devices of `backend` this machine has (asked in a process of its own)."""
    code = {"torch": "import torch; print('cpu', 'cuda' if torch.cuda.is_available() else '', "
                     "'mps' if torch.backends.mps.is_available() else '')",
            "mlx": "import backends.mlx_stage, mlx.core as mx; print('cpu', 'gpu' if mx.metal.is_available() else '')"}
    r = subprocess.run([sys.executable, "-c", code[backend]], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []


def run_selftest(backends: list[str] | None = None, device: str | None = None, log=print) -> list[Check]:
    from .fetch import default_model_dir, is_imported
    from ..compose.stages import available_backends

    backends = backends or available_backends()
    if not backends:
        raise UserError("no backend is installed here (pip install 'hetpipe[torch]' or 'hetpipe[mlx]')")
    smollm2 = default_model_dir()
    checks = []
    with tempfile.TemporaryDirectory(prefix="hetpipe-selftest-") as tmp:
        tiny = write_tiny(Path(tmp) / "tiny")
        for backend in backends:
            for dev in [device] if device else devices(backend):
                checks += check_model(backend, dev, "tiny", tiny, log)
                if is_imported(smollm2):
                    checks += check_model(backend, dev, "smollm2", smollm2, log)
                checks += check_quantized(backend, dev, tiny, Path(tmp) / f"{backend}-{dev}", log)
            checks.append(check_daemon(backend, tiny, log))
            for dev in [device] if device else devices(backend):
                log(decode_speed(backend, dev, smollm2 if is_imported(smollm2) else tiny))
    failed = [c for c in checks if not c.ok]
    log(f"{len(checks) - len(failed)} of {len(checks)} checks passed" + (": this machine computes what "
        "transformers computes" if not failed else ""))
    return checks


def write_reference(path: Path) -> None:
    """Regenerate the stored reference with transformers (run by hand: `python -m engine.app.selftest`)."""
    from backends.torch_stage.reference import transformers_reference

    from .fetch import default_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        data = {"tiny": transformers_reference(write_tiny(Path(tmp) / "tiny"), PROMPTS["tiny"], TOKENS)}
    data["smollm2"] = transformers_reference(default_model_dir(), PROMPTS["smollm2"], TOKENS)
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    write_reference(Path(__file__).with_name(REFERENCE))
