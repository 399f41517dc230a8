"""Hugging Face Hub model ids resolved from the local cache, without network or huggingface_hub.

A download (`huggingface-cli download`, `snapshot_download`, `from_pretrained`) leaves

    <cache>/models--<owner>--<name>/refs/main          the commit hash of the "main" revision
    <cache>/models--<owner>--<name>/snapshots/<hash>/  the repository's files at that commit,
                                                      symlinks to ../../blobs/<sha>
    <cache>/models--<owner>--<name>/blobs/<sha>        the file contents

where <cache> is $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
`local_path(path_or_id)` returns `path_or_id` itself when it exists, else the cached snapshot
of the Hub id it names ("owner/name", optionally "owner/name@revision" with a branch, tag or
commit hash), else it raises NotCachedError with one line saying where it looked.
"""
import os
import re

# owner/name as the Hub spells repository ids, optionally @revision.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class NotCachedError(FileNotFoundError):
    """Neither an existing path nor a Hub id whose snapshot is in the local cache."""


def cache_dir() -> str:
    """Where huggingface_hub keeps downloads, by its own environment variables."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def parse_id(text: str) -> tuple[str, str] | None:
    """(repo id, revision) of a Hub id "owner/name[@revision]", or None when `text` is not one."""
    match = _HUB_ID.match(text)
    if match is None or text.startswith(("./", "../")):
        return None
    return match.group("repo"), match.group("revision") or "main"


def snapshot(repo_id: str, revision: str = "main", cache: str | None = None) -> str:
    """The cached snapshot folder of `repo_id` at `revision`; NotCachedError when absent."""
    cache = cache or cache_dir()
    root = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    where = f"{repo_id}: not a local path, and not in the Hugging Face cache"
    if not os.path.isdir(root):
        raise NotCachedError(f"{where} ({root} does not exist; download it first, e.g. "
                             f"`huggingface-cli download {repo_id}`, or set HF_HUB_CACHE)")
    commit = revision
    if not _COMMIT.match(revision):
        ref = os.path.join(root, "refs", revision)
        if not os.path.isfile(ref):
            raise NotCachedError(f"{where} at revision {revision!r} (no {ref})")
        with open(ref) as f:
            commit = f.read().strip()
    folder = os.path.join(root, "snapshots", commit)
    if not os.path.isdir(folder):
        raise NotCachedError(f"{where}: {revision!r} is commit {commit}, whose snapshot "
                             f"{folder} is missing")
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
