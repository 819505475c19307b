"""Hub ids as model inputs: ``owner/name`` or ``owner/name:path/in/repo``, fetched through the hub
cache with allow patterns, so only safetensors weights and their small sidecars are ever downloaded
(never pickles, ONNX, Flax or GGUF copies). ``HF_HUB_OFFLINE=1`` serves them from the cache alone."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import VpatchError

REPO_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*)(?::(?P<path>[^:]+))?$"
)

SIDECARS = ("*.json", "*.txt", "*.model", "*.jinja", "*.md")
# a whole repo: a pipeline's model_index.json, every component's configs, tokenizers and safetensors weights
REPO_PATTERNS = [f"{d}{p}" for d in ("", "*/") for p in (*SIDECARS, "*.safetensors")]


class HubError(VpatchError):
    """A hub id could not be resolved (not cached offline, unknown repo or revision, no such path)."""


def parse(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, path or None)`` when ``spec`` reads as a hub id, else None."""
    m = REPO_ID.match(str(spec))
    if m is None or ".." in m.group("repo"):
        return None
    path = m.group("path")
    return m.group("repo"), (path.strip("/") or None) if path else None


def patterns_for(path: str | None) -> list[str]:
    """What apply needs of a repo: all of it (weights + sidecars), one file, one index with its
    shards, or one component folder."""
    if path is None:
        return list(REPO_PATTERNS)
    if path.endswith(".safetensors"):
        return [path]
    if path.endswith(".index.json"):
        folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
        return [path, f"{folder}*.safetensors"]
    return [f"{path}/{p}" for p in (*SIDECARS, "*.safetensors")]


def fetch(spec: str, revision: str | None = None, patterns: list[str] | None = None) -> Path:
    """Download (or find in the cache) what ``spec`` names; returns the local path of the repo, file or folder.
    ``patterns`` narrow a whole-repo download (e.g. to a family's components); ``owner/name:PATH`` always
    fetches that path."""
    parsed = parse(spec)
    if parsed is None:
        raise HubError(
            f"{spec}: no such file or folder, and not a hub id (owner/name or owner/name:path/in/repo)"
        )
    repo, path = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        allow = patterns_for(path) if path is not None or not patterns else patterns
        root = Path(snapshot_download(repo, revision=revision, allow_patterns=allow))
    except LocalEntryNotFoundError:
        raise HubError(
            f"{spec}: no such local path, and {repo} is not in the local hub cache while the hub cannot be reached;"
            f" download it first (huggingface-cli download {repo}) or pass a local path"
        ) from None
    except GatedRepoError:
        raise HubError(
            f"{repo} is gated: accept its license on the hub and log in (huggingface-cli login), then retry"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{spec}: no such local path, and no repository {repo} on the hub (if it is private, log in with a token that can read it)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{repo}: no revision {revision!r}") from None
    except EntryNotFoundError:
        raise HubError(f"{repo}: no {path!r} in the repository") from None
    except HfHubHTTPError as e:
        raise HubError(
            f"{repo}: the hub refused the download ({e.__class__.__name__}); check the id and your token"
        ) from None
    except OSError as e:
        raise HubError(
            f"{repo}: download failed ({e.strerror or e}); check the network and the disk space of the hub cache"
        ) from None
    target = root / path if path else root
    if not target.exists():
        raise HubError(
            f"{repo}: the repository has no {path!r} among its safetensors files and configs"
        )
    return target
