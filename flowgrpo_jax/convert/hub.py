"""Hugging Face Hub model ids resolved from the local cache by huggingface_hub, offline.

`local_path(path_or_id)` returns `path_or_id` itself when it exists, else the cached snapshot
of the Hub id it names ("owner/name", optionally "owner/name@revision" with a branch, tag or
commit hash) as `huggingface_hub.snapshot_download(..., local_files_only=True)` finds it
(nothing is downloaded), else it raises NotCachedError with one line saying where it looked.
A snapshot whose files point at missing blobs (an interrupted download) is refused too.
"""
import os
import re

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

# owner/name as the Hub spells repository ids, optionally @revision.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


class NotCachedError(FileNotFoundError):
    """Neither an existing path nor a Hub id whose snapshot is in the local cache."""


def parse_id(text: str) -> tuple[str, str] | None:
    """(repo id, revision) of a Hub id "owner/name[@revision]", or None when `text` is not one."""
    match = _HUB_ID.match(text)
    if match is None or text.startswith(("./", "../")):
        return None
    return match.group("repo"), match.group("revision") or "main"


def snapshot(repo_id: str, revision: str = "main") -> str:
    """The cached snapshot folder of `repo_id` at `revision` in huggingface_hub's cache
    ($HF_HUB_CACHE, else $HF_HOME/hub); NotCachedError when absent."""
    cache = constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                   local_files_only=True)
    except LocalEntryNotFoundError:
        raise NotCachedError(f"{repo_id}: not a local path, and not in the Hugging Face cache "
                             f"{cache} at revision {revision!r}; download it first, e.g. "
                             f"`hf download {repo_id}`, or set HF_HUB_CACHE") from None
    broken = [os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder)
              for n in names if not os.path.exists(os.path.join(d, n))]
    if broken:
        raise NotCachedError(f"{repo_id}: the cached snapshot {folder} is incomplete ("
                             f"{len(broken)} file(s) point at missing blobs, e.g. "
                             f"{sorted(broken)[0]}); download it again")
    return folder


def local_path(path_or_id: str) -> str:
    """`path_or_id` when it exists on disk or cannot be a Hub id (the caller reports it
    missing), else the cached snapshot of the Hub id it names (NotCachedError when absent)."""
    if os.path.exists(path_or_id):
        return path_or_id
    parsed = parse_id(path_or_id)
    return path_or_id if parsed is None else snapshot(*parsed)
