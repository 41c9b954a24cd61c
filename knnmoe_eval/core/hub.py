"""Memories on the Hugging Face Hub: `memory=org/name[/subfolder]` read through huggingface_hub, and pushed back.

Names resolve as `from_pretrained` resolves models: a local directory of that name wins; otherwise a name of the
form `org/name` (optionally `/sub/folder`, as one repo can hold memories for several models) is a model repo on
the Hub, read at `memory_revision` (a branch, tag or commit; default main) with huggingface_hub's
`snapshot_download`, so its cache, `HF_HUB_OFFLINE`, tokens (`hf auth login`, `HF_TOKEN`) and mirrors
(`HF_ENDPOINT`) work as they do for models. Only a memory's own files are fetched (manifest, layer files, trained
indexes, card), and the downloaded directory is then loaded like any other: every checksum, fingerprint and the
schema are checked by `load_memory`. The commit the revision resolved to is pinned in `MemorySource.record()`,
which the harness writes into the results JSON.

Pushing uploads exactly the files a loader reads (the manifest, the layer files it lists, trained indexes whose
checksums hold) and the card, in one commit (`HfApi.create_commit`), after checking the memory as loading would.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import KnnMoeError
from .card import CARD, render_card
from .memory import MANIFEST, load_memory

_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class MemorySource:
    """Where a memory was read from: a local directory, or a Hub repo at a pinned commit."""

    path: Path  # the directory that holds manifest.json
    repo_id: str | None = None
    subfolder: str | None = None
    revision: str | None = None  # as asked: a branch, tag or commit
    commit: str | None = None  # what it resolved to

    def record(self) -> dict:
        """What the results JSON says about the memory's origin (with the commit, a run can be repeated)."""
        if self.repo_id is None:
            return {"source": "local", "path": str(self.path)}
        return {"source": "hub", "repo_id": self.repo_id, "subfolder": self.subfolder, "revision": self.revision,
                "commit": self.commit, "path": str(self.path)}


def split_hub_id(memory: str) -> tuple[str, str | None] | None:
    """(repo id, subfolder or None) when `memory` can name a Hub repo (`org/name[/sub/folder]`), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = memory.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts) or memory.startswith("~"):
        return None
    repo_id = "/".join(parts[:2])
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, "/".join(parts[2:]) or None


def _patterns(subfolder: str | None) -> list[str]:
    """A memory's own files: nothing else in the repo is downloaded (nor could anything else be loaded)."""
    prefix = f"{subfolder}/" if subfolder else ""
    return [prefix + p for p in (MANIFEST, "layer_*.safetensors", "index/*", CARD)]


def resolve_memory(memory: str | Path, revision: str | None = "main") -> MemorySource:
    """The memory directory `memory` names: a local directory when one exists, else a Hub repo's snapshot."""
    memory = str(memory)
    hub = None if Path(memory).expanduser().exists() else split_hub_id(memory)
    if hub is None:
        return MemorySource(Path(memory).expanduser())
    repo_id, subfolder = hub
    revision = revision or "main"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from .. import __version__

    where = f"memory={memory}: there is no local directory of that name, and the Hub repo {repo_id!r}"
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_patterns(subfolder),
                                          library_name="knnmoe-eval", library_version=__version__))
    except RevisionNotFoundError:
        raise KnnMoeError(f"{where} has no revision {revision!r}; pass memory_revision=<an existing branch, tag or "
                          "commit> (default main)") from None
    except GatedRepoError:
        raise KnnMoeError(f"{where} is gated: request access on its page, then log in (`hf auth login` or "
                          "HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise KnnMoeError(f"{where} does not exist (or is private: log in with `hf auth login` or set HF_TOKEN); "
                          "check the name, or build a memory there with mode=build") from None
    except LocalEntryNotFoundError as e:
        offline = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        raise KnnMoeError(f"{where} has no cached snapshot for revision {revision!r}, and {offline}. Download it "
                          f"once online (`hf download {repo_id} --revision {revision}`), or pass the memory's local "
                          f"directory ({type(e).__name__})") from None
    except HfHubHTTPError as e:
        raise KnnMoeError(f"{where} at revision {revision!r} could not be downloaded: {e}") from None
    commit = snapshot.name if _COMMIT.fullmatch(snapshot.name) else None  # snapshots/<commit>, the cache's layout
    path = snapshot / subfolder if subfolder else snapshot
    if not (path / MANIFEST).is_file():
        raise KnnMoeError(
            f"memory={memory}: the Hub repo {repo_id!r} at revision {revision!r} (commit {commit}) has no "
            f"{(subfolder + '/') if subfolder else ''}{MANIFEST}: it holds no kNN-MoE memory there (a memory in a "
            f"subfolder is named {repo_id}/SUBFOLDER)"
        )
    return MemorySource(path, repo_id, subfolder, revision, commit)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# -- pushing ------------------------------------------------------------------------------------------------


def verified_files(memory_dir: str | Path) -> list[str]:
    """The files of `memory_dir` a loader reads, relative to it, each checked: the manifest (its checksum and
    schema), its layer files (every sha256, shapes, finite values: `load_memory`), and every trained index for
    its current keys (the sidecar's sha256, read by faiss). What `knnmoe-memory verify` checks and `push` uploads;
    a defect raises."""
    from . import index as knn_index

    out = Path(memory_dir)
    memory = load_memory(out, verify=True)
    files = [MANIFEST] + sorted(e["file"] for e in memory.manifest["layers"].values())
    keys = {e["sha256"] for e in memory.manifest["layers"].values()}
    for sidecar in sorted((out / knn_index.INDEX_DIR).glob("*.faiss.json")):
        spec = json.loads(sidecar.read_text()).get("spec", {})
        path = sidecar.with_name(sidecar.name.removesuffix(".json"))
        if spec.get("keys_sha256") not in keys:
            continue  # trained for keys this memory no longer has: no loader would read it
        try:
            if knn_index.read_saved_index(path, spec) is None:
                continue  # its save never finished
        except knn_index.RefusedIndex as e:  # evaluation would refuse it and retrain: a defect of the shared memory
            raise KnnMoeError(f"the saved index {path.relative_to(out)} would be refused: {e}") from None
        files += [str(p.relative_to(out)) for p in (path, sidecar)]
    return files


def push_operations(memory_dir: str | Path, repo_id: str, path_in_repo: str | None = None) -> list:
    """The commit that pushes `memory_dir` to `repo_id`: one `CommitOperationAdd` per file of `verified_files`,
    and the card. The card is the folder's own README.md when someone edited it, else rendered with `repo_id`."""
    from huggingface_hub import CommitOperationAdd

    out = Path(memory_dir)
    files = verified_files(out)
    manifest = json.loads((out / MANIFEST).read_text())
    card = out / CARD
    edited = card.is_file() and card.read_text(encoding="utf-8") != render_card(manifest)
    card_bytes = card.read_bytes() if edited else render_card(manifest, repo_id).encode()
    prefix = PurePosixPath(path_in_repo or "")
    ops = [CommitOperationAdd(path_in_repo=str(prefix / f), path_or_fileobj=str(out / f)) for f in files]
    return ops + [CommitOperationAdd(path_in_repo=str(prefix / CARD), path_or_fileobj=card_bytes)]


def push_memory(memory_dir: str | Path, repo_id: str, *, revision: str | None = None,
                path_in_repo: str | None = None, private: bool | None = None, create_pr: bool = False,
                commit_message: str | None = None):
    """Create `repo_id` if needed and upload the memory with its card in one commit; huggingface_hub's CommitInfo."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    operations = push_operations(memory_dir, repo_id, path_in_repo)
    api = HfApi(library_name="knnmoe-eval")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"kNN-MoE memory {Path(memory_dir).name}")
    except OfflineModeIsEnabled:
        raise KnnMoeError(f"cannot push {memory_dir} to {repo_id}: HF_HUB_OFFLINE is set; unset it") from None
    except HfHubHTTPError as e:
        raise KnnMoeError(f"pushing {memory_dir} to {repo_id} failed: {e}") from None
    except OSError as e:  # no token, or no connection
        raise KnnMoeError(f"pushing {memory_dir} to {repo_id} failed ({e}); log in with `hf auth login` or set "
                          "HF_TOKEN") from None
