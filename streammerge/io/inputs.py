"""One resolver for every way a model is named: a path, a ``file://`` URL, a remote URL, or
a Hugging Face repo id in the local cache.

Every input goes through ``resolve_input`` before anything looks at it: opening it,
checking the output against it (a path the run creates, renames or deletes must lie apart
from every input, whatever form the input was given in), fingerprinting and recording it.
A ``file://`` URL is a local directory like any other (read with O_DIRECT, checked for
overlap, recorded by its path), so ``streammerge file:///d/a file:///d/b --base ... -o /d/a
--overwrite`` is refused like the same command with plain paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.io import safejson
from streammerge.io.reader import ModelDir, open_model
from streammerge.io.remote import DEFAULT_HTTP_TIMEOUT_S, open_remote_model

#: URL schemes read by ranged requests (``streammerge.io.remote``); ``file://`` is local.
REMOTE_PREFIXES = ("http://", "https://", "hf://", "s3://", "s3a://", "gs://", "gcs://")
FILE_PREFIX = "file://"


@dataclass(frozen=True)
class InputRef:
    """A model reference, resolved.

    Attributes:
        given: the reference as the user wrote it (messages, model cards).
        url: the URL of a remote model (None for a local one).
        path: the local directory (None for a remote model); not resolved through
            symlinks (``streammerge.io.paths.real`` does that for overlap checks).
    """

    given: str
    url: str | None = None
    path: Path | None = None

    @property
    def is_remote(self) -> bool:
        """True for a model read by ranged requests."""
        return self.url is not None


def is_url(ref) -> bool:
    """True for ``scheme://...`` strings (a local path never has ``://``)."""
    return isinstance(ref, str) and "://" in ref


def file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL, as fsspec reads it (the rule earlier versions
    followed when they opened such inputs through fsspec): ``file:///abs`` is ``/abs``, a
    path after ``file://`` without the third slash is relative to the working directory,
    ``~`` is expanded, percent-escapes are kept."""
    from fsspec.implementations.local import LocalFileSystem

    return Path(LocalFileSystem._strip_protocol(url))


def is_repo_id(ref: str) -> bool:
    """True when ``ref`` is written as a Hugging Face repo id, ``org/name[@revision]`` (two
    non-empty parts, not a relative or home path); whether a folder of that name exists is
    the caller's question."""
    repo = ref.partition("@")[0]
    return repo.count("/") == 1 and all(repo.split("/")) and not repo.startswith((".", "/", "~"))


def _hf_cache(ref: str) -> Path | None:
    """The local snapshot of a Hugging Face repo id (``org/name[@revision]``), or None."""
    repo, _, revision = ref.partition("@")
    if not is_repo_id(ref):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except Exception:  # noqa: BLE001 - any lookup failure means: not in the cache
        return None


def resolve_input(ref: str | os.PathLike) -> InputRef:
    """Resolve a model reference: ``file://`` to its local path, a remote URL kept as a URL,
    a path that does not exist but names a repo in the local Hugging Face cache to that
    snapshot, any other path as given (``~`` expanded).

    Raises:
        MergeError: a URL scheme streammerge cannot read (one line naming it).
    """
    given = os.fspath(ref)
    if isinstance(given, bytes):
        given = os.fsdecode(given)
    if given.startswith(FILE_PREFIX):
        return InputRef(given, None, file_url_path(given))
    if is_url(given):
        if not given.startswith(REMOTE_PREFIXES):
            raise MergeError(
                f"unsupported URL scheme {given.split('://', 1)[0]}://",
                given,
                None,
                "use a path, file://, https://, hf://, s3:// or gs://",
            )
        return InputRef(given, given, None)
    path = Path(given).expanduser()
    if not path.exists():
        cached = _hf_cache(given)
        if cached is not None:
            return InputRef(given, None, cached)
    return InputRef(given, None, path)


def resolve_output(ref: str | os.PathLike) -> Path:
    """The local directory of an output given as a path or a ``file://`` URL.

    Raises:
        MergeError: any other URL (outputs are written locally).
    """
    given = os.fspath(ref)
    if isinstance(given, str) and given.startswith(FILE_PREFIX):
        return file_url_path(given)
    if is_url(given):
        raise MergeError(
            "the output must be a local directory", given, None, "give a path or a file:// URL"
        )
    return Path(given).expanduser()


def open_input(ref: str | Path, http_timeout: float = DEFAULT_HTTP_TIMEOUT_S) -> ModelDir:
    """A model by any reference ``streammerge.io.inputs.resolve_input`` takes: a directory
    (also as ``file://`` or a Hugging Face cache id), or a model by URL (``https://``,
    ``hf://``...; headers only; HTTP requests time out after ``http_timeout`` seconds
    without data).

    ``MODEL+ADAPTER`` (``streammerge.io.lora.split_reference``) opens MODEL with the PEFT
    LoRA adapter folder ADAPTER applied (docs/SPEC.md "LoRA inputs (v3)").

    Raises:
        MergeError: the reference cannot be resolved or the model fails its checks (or
            its adapter does).
    """
    from streammerge.io.lora import open_adapted, split_reference

    given = os.fspath(ref)
    model_ref, adapter = split_reference(given, _names_local_dir)
    resolved = resolve_input(model_ref)
    if resolved.is_remote:
        model = open_remote_model(resolved.url, http_timeout)
    else:
        model = open_model(resolved.path)
    return model if adapter is None else open_adapted(model, adapter)


def _names_local_dir(ref: str) -> bool:
    """True when ``ref`` as a whole resolves to an existing local directory."""
    try:
        resolved = resolve_input(ref)
    except MergeError:
        return False
    return not resolved.is_remote and resolved.path.is_dir()


def is_remote(m: ModelDir) -> bool:
    """True for a model opened by URL."""
    return getattr(m, "url", None) is not None


def config_name_or_path(m: ModelDir) -> str | None:
    """``_name_or_path`` from a local model's ``config.json`` when it is a Hugging Face repo
    id (``is_repo_id``, and no such local path), else None: also for a config.json that is
    missing, over 1 MiB or not JSON (the side-file copy reports those)."""
    try:
        cfg = safejson.load_file(Path(m.path) / "config.json", max_depth=64, max_bytes=1 << 20,
                                 todo="", what="config")  # fmt: skip
    except MergeError:
        return None
    name = cfg.get("_name_or_path") if isinstance(cfg, dict) else None
    if isinstance(name, str) and is_repo_id(name) and not Path(name).exists():
        return name
    return None


def input_record(m: ModelDir) -> dict:
    """How streammerge.json names an input: its path, or its URL and pinned revision (and
    a LoRA adapter's path and fingerprint under ``adapter``)."""
    adapter = getattr(m, "adapter", None)
    if is_remote(m):  # stamp: the files' sizes and ETags (a finished --resume compares it)
        rec = {"url": m.url, "revision": m.revision, "fingerprint": m.fingerprint,
               "stamp": m.stamp}  # fmt: skip
        if adapter is not None:
            rec["adapter"] = dict(adapter)
        return rec
    rec = {"path": str(m.path.resolve()), "fingerprint": m.fingerprint}
    if adapter is not None:
        rec["adapter"] = dict(adapter)
    name = config_name_or_path(m)
    if name is not None:
        rec["name_or_path"] = name  # a Hub id for the model card, where config.json has one
    return rec
