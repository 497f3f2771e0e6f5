"""Models named by a Hugging Face id, `ORG/NAME[@REVISION]`, fetched a stage's share at a time.

`huggingface_hub` does the downloading: its cache (`HF_HOME`, `HF_HUB_CACHE`), `HF_TOKEN` for gated
repos, `HF_HUB_OFFLINE`, `HF_ENDPOINT`, resumed downloads and progress bars. The coordinator fetches
only the config, tokenizer and index files (`fetch_meta`); the directory it gets is the cache's
snapshot of the repo's commit, where the weight files appear as a stage fetches them. A stage
fetches the safetensors files holding its layers, plus the embedding or head where it needs them
(`ensure_layers`), from the index's weight map; a re-plan that moves layers fetches only what is
missing. Any snapshot directory names its repo and commit (`source_of`), so whatever holds one can
fetch more of it. mlx-community's quantized repos and plain transformers repos are laid out alike.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..core.config import ModelConfig
from ..core.errors import UserError
from ..core.weights import stage_tensor_names

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
SNAPSHOT = re.compile(r".*/models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?")
# what a coordinator needs: no weights (a chat template may be a file of its own)
META_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "model.safetensors.index.json"]


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo, revision) if `spec` names a Hub repo rather than a local path; else None."""
    if Path(spec).exists() or spec.startswith((".", "/", "~")) or not HUB_ID.fullmatch(spec):
        return None
    repo, _, revision = spec.partition("@")
    return repo, revision or None


def source_of(model_dir: str | Path) -> tuple[str, str] | None:
    """(repo, commit) of a directory that is a snapshot in huggingface_hub's cache, else None."""
    m = SNAPSHOT.fullmatch(str(Path(model_dir).resolve()) if Path(model_dir).exists() else str(model_dir))
    return (f"{m['org']}/{m['name']}", m["commit"]) if m else None


def fetch_meta(repo: str, revision: str | None = None) -> Path:
    """The snapshot directory of `repo` at `revision`, holding its config, tokenizer and index files."""
    from huggingface_hub import snapshot_download

    path = _hub_call(snapshot_download, repo, repo_id=repo, revision=revision, allow_patterns=META_FILES,
                     **_where())
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{repo} has no config.json: not a transformers or MLX model repo")
    return Path(path)


def stage_files(model_dir: Path, cfg: ModelConfig, first: int, last: int) -> list[str]:
    """The weight files a stage holding layers [first, last] needs, by the index's weight map."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors"]  # one file holds everything
    weight_map = json.loads(index.read_text())["weight_map"]
    return sorted({weight_map[n] for n in stage_tensor_names(cfg, weight_map, first, last)})


def ensure_layers(model_dir: str | Path, first: int, last: int) -> list[str]:
    """Fetch into a snapshot directory the weight files layers [first, last] need and it lacks;
    returns the files fetched. A directory that is not a snapshot is left alone (it has them or not)."""
    source = source_of(model_dir)
    if source is None:
        return []
    model_dir = Path(model_dir)
    missing = [f for f in stage_files(model_dir, ModelConfig.load(model_dir), first, last)
               if not (model_dir / f).is_file()]
    if missing:
        from huggingface_hub import hf_hub_download

        repo, commit = source
        for f in missing:
            _hub_call(hf_hub_download, repo, repo_id=repo, filename=f, revision=commit, **_where())
    return missing


def has_layers(model_dir: str | Path, first: int, last: int) -> bool:
    model_dir = Path(model_dir)
    return all((model_dir / f).is_file() for f in stage_files(model_dir, ModelConfig.load(model_dir), first, last))


def _where() -> dict:
    """The endpoint and cache as the environment says now (huggingface_hub reads them once, at import)."""
    out = {}
    if os.environ.get("HF_ENDPOINT"):
        out["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")
    cache = os.environ.get("HF_HUB_CACHE") or (os.environ.get("HF_HOME") and os.path.join(os.environ["HF_HOME"], "hub"))
    if cache:
        out["cache_dir"] = cache
    return out


def _hub_call(fn, repo: str, **kw):
    """A huggingface_hub call; its errors as one line (a UserError: the CLI exits 2)."""
    from huggingface_hub import errors

    try:
        return fn(**kw)
    except errors.GatedRepoError:
        raise UserError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"no model {repo!r} on the Hub (or it is private: set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{repo} has no revision {kw.get('revision')!r}") from None
    except errors.EntryNotFoundError:
        raise UserError(f"{repo} has no file {kw.get('filename')!r}") from None
    except errors.LocalEntryNotFoundError:
        raise UserError(f"{repo} is not in the cache, and the Hub cannot be reached (HF_HUB_OFFLINE, or no "
                        "network)") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise UserError(f"cannot fetch {repo}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
