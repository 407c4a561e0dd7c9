"""Resolve a model argument: a local directory, or a Hugging Face repo id fetched with huggingface-hub.

Respects ``HF_HOME`` and ``HF_HUB_OFFLINE`` (huggingface-hub reads them itself); offline and not
cached is a clear error.
"""

from __future__ import annotations

import re
from pathlib import Path

from .loading import CheckpointError

KNOWN_REPOS = ("VARGPT-family/VARGPT-v1.1", "VARGPT-family/VARGPT-v1.1-edit")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


NANO = "nano"
NANO_DIR = Path(__file__).resolve().parent / "nano" / "model"
"""The nano model shipped in the package (``vargpt-mlx train nano`` makes it)."""


def resolve_model_path(source: str | Path) -> Path:
    """A local checkpoint directory for ``source``: ``"nano"`` (the shipped model, unless a local
    directory of that name exists), a local path, or a repo id (downloaded if needed)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source) == NANO:
        if not (NANO_DIR / "config.json").is_file():
            raise CheckpointError(f"the nano model is not installed in {NANO_DIR} (make it with "
                                  "'vargpt-mlx train nano --out DIR --ship')")
        return NANO_DIR
    s = str(source)
    if not _REPO_ID.match(s) or s.startswith((".", "/", "~")) or Path(s.split("/")[0]).expanduser().exists():
        # not a repo id, or a path whose first directory exists here (a mistyped local path)
        raise CheckpointError(f"model path {s} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(s, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"model path {s} does not exist, and {s} is not in the Hugging Face cache and the hub cannot be "
            "reached (offline or HF_HUB_OFFLINE=1); download it first or pass a local directory"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"model path {s} does not exist (nor does a Hugging Face repo of that name, "
                              "or it needs a token)") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot fetch {s} from the Hugging Face hub: {str(e).splitlines()[0]}") from None
