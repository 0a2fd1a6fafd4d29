"""Results bundles: what the book reads from a profile's runs, in one checked archive, to build the book anywhere.

``transferstudy export-results BUNDLE.tar.gz --profile P`` (``export``) writes a gzip'd tar holding:

* ``manifest.json``, its first member: the bundle format and version, the transferstudy version that wrote it, the
  profile, the runs and searches it holds, and the SHA-256 and size of every other member;
* ``runs/<profile>/<dataset>/<model>/<regime>/``: every run of the profile that has a record, as the store reads it
  (its latest outcome: a run whose last attempt failed is its ``<regime>.failed/`` folder): ``RUN_FILES`` and the
  plot embeddings; with ``--with-models`` also its ``bundle/`` folder (checkpoints, TorchScript, skops);
* ``runs/search/<name>/``: each search the Search chapter shows (``SEARCH_FILES``) and its trials' run records;
* ``data-summary/``: what the Datasets and Errors chapters read from the data root (``chapters.data_summary``):
  split sizes, images per class, the label rules, and the pictures they show as small PNGs; never the dataset.

``transferstudy import-results BUNDLE --to DIR`` (``import_bundle``) unpacks it: a bundle whose members do not match
its manifest (altered, missing or extra), from another bundle format version, or that is no bundle at all is refused
before anything is put in place. ``transferstudy book-data --results DIR`` (``open_results``) checks the unpacked
folder again and builds the book's pages from it; the pages take the data summary in place of the data root.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from . import config

FORMAT = "transferstudy results bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_SUMMARY = "data-summary"
TOPS = ("runs", DATA_SUMMARY)  # the folders of a bundle
# What the book reads of a run (the analyses' tables too); the feature-reuse runs' representations-*.npz (up to
# hundreds of MB at profile full) stay in the run folder.
RUN_FILES = ("meta.json", "params.json", "metrics.json", "split.json", "curves.csv", "predictions.npz",
             "notebook.ipynb", "feature_reuse.csv", "cka_matrices.npz", "data_scarcity.csv")
MODELS = "bundle"  # a run's fine-tuned model bundle: only with --with-models
SEARCH_FILES = ("summary.json", "trials.csv", "importances.csv", "study.db")
TRIAL_FILES = ("meta.json", "params.json", "metrics.json", "split.json", "predictions.npz")  # a trial's interval
DERIVED = ("runs", ".cache")  # the projection cache a book build writes beside the unpacked runs
CHUNK = 1 << 20


class ResultsError(ValueError):
    """A results bundle that cannot be written or used; the message names the file or member and the fix."""


def version() -> str:
    """The installed transferstudy's version (pyproject.toml's, as installed)."""
    return metadata.version("transferstudy")


def _sha256(fh: BinaryIO) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := fh.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


# --- export -------------------------------------------------------------------------------------------


def _run_members(run_dir: Path, arc: str, with_models: bool) -> dict[str, Path]:
    files = [run_dir / name for name in RUN_FILES] + sorted(run_dir.glob("embeddings-*.npz"))
    members = {f"{arc}/{f.name}": f for f in files if f.is_file()}
    if with_models and (run_dir / MODELS).is_dir():
        members |= {f"{arc}/{f.relative_to(run_dir).as_posix()}": f
                    for f in sorted((run_dir / MODELS).rglob("*")) if f.is_file()}
    return members


def _search_members(folder: Path) -> dict[str, Path]:
    arc = f"runs/search/{folder.name}"
    members = {f"{arc}/{name}": folder / name for name in SEARCH_FILES if (folder / name).is_file()}
    for meta in sorted(folder.glob("trials/*/*/*/*/*/meta.json")):
        trial = meta.parent
        members |= {f"{arc}/{trial.relative_to(folder).as_posix()}/{name}": trial / name
                    for name in TRIAL_FILES if (trial / name).is_file()}
    return members


class _Hashing:
    """A file read for the archive, hashed on the way (what was packed is what the manifest says)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.digest = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self.fh.read(size)
        self.digest.update(chunk)
        return chunk


def export(bundle: str | Path, profile: str, runs_dir: str | Path = "runs", data_root: str | Path = "data",
           with_models: bool = False) -> dict[str, Any]:
    """Write ``bundle`` (``*.tar.gz``) from ``<runs_dir>/<profile>``, its searches and ``data_root``; returns the
    manifest. Everything is checked before the archive is written; the archive appears whole or not at all."""
    from .report import chapters  # the data's reader (it imports torch: only for exporting)
    from .report.store import Store, StoreError

    bundle, runs_dir, data_root = Path(bundle), Path(runs_dir), Path(data_root)
    if not bundle.name.endswith(".tar.gz"):
        raise ResultsError(f"BUNDLE={str(bundle)!r} must be a .tar.gz file name, e.g. results-{profile}.tar.gz")
    if profile not in config.profiles():
        raise ResultsError(f"--profile {profile!r} is not a profile; use one of {', '.join(config.profiles())}")
    profile_dir = runs_dir / profile
    if not profile_dir.is_dir():
        raise ResultsError(f"--runs-dir {str(runs_dir)!r} has no {profile}/ folder: no run of profile {profile} to "
                           f"export; run the study first (`transferstudy run --profile {profile}`) or pass the "
                           f"runs folder that holds it")
    if not data_root.is_dir():
        raise ResultsError(f"--data-root {str(data_root)!r} does not exist; pass the data root the runs used (the "
                           f"folder holding cifar10/ and ferplus/): the bundle keeps what the book shows of the data")
    store = Store.load(profile_dir, data_root)
    damaged = [f"{run.key}: {run.error}" for run in store.every_run() if run.status == "damaged"]
    if damaged:
        raise ResultsError(f"{len(damaged)} run(s) of profile {profile} are damaged, and a bundle never carries a "
                           f"damaged record; rerun them (the command is in each message) and export again:\n  "
                           + "\n  ".join(damaged))
    exported = [run for run in store.every_run() if run.run_dir is not None]
    if not exported:
        raise ResultsError(f"{profile_dir} holds no run record; run the study first "
                           f"(`transferstudy run --profile {profile}`)")
    files: dict[str, Path] = {}
    for run in exported:
        files |= _run_members(run.run_dir, f"runs/{run.run_dir.relative_to(runs_dir).as_posix()}", with_models)
    searches = store.searches()
    for folder in searches:
        files |= _search_members(folder)
    try:
        summary, pictures = chapters.data_summary(store)
    except StoreError as exc:
        raise ResultsError(str(exc)) from exc
    unusable = {run.dataset for run in store.finished()} & {d for d, e in summary["datasets"].items()
                                                            if "unavailable" in e}
    if unusable:
        raise ResultsError("; ".join(summary["datasets"][d]["unavailable"] for d in sorted(unusable))
                           + f" But runs on {', '.join(sorted(unusable))} finished: pass the data root they used "
                             f"(--data-root) so that the bundle shows their data")
    payloads = {f"{DATA_SUMMARY}/{chapters.SUMMARY_FILE}": (json.dumps(summary, indent=2) + "\n").encode()}
    payloads |= {f"{DATA_SUMMARY}/{name}": png for name, png in pictures.items()}

    members: dict[str, dict[str, Any]] = {}
    for name, path in files.items():
        with open(path, "rb") as fh:
            sha, size = _sha256(fh)
        members[name] = {"sha256": sha, "size": size}
    for name, payload in payloads.items():
        members[name] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "written_by": {"transferstudy": version()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "profile": profile,
        "with_models": with_models,
        "runs": [{"key": run.key, "status": run.status,
                  "path": f"runs/{run.run_dir.relative_to(runs_dir).as_posix()}"} for run in exported],
        "not_run": sorted(run.key for run in store.every_run() if run.run_dir is None),
        "searches": [f"runs/search/{folder.name}" for folder in searches],
        "data_summary": DATA_SUMMARY,
        "members": dict(sorted(members.items())),
    }
    _write_archive(bundle, manifest, files, payloads, runs_dir)
    return manifest


def _info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    return info


def _write_archive(bundle: Path, manifest: dict[str, Any], files: dict[str, Path], payloads: dict[str, bytes],
                   runs_dir: Path) -> None:
    bundle.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=bundle.parent, prefix=f".{bundle.name}.", suffix=".tmp")
    now = _dt.datetime.now().timestamp()
    try:
        with os.fdopen(fd, "wb") as raw:
            _pack(raw, manifest, files, payloads, runs_dir, now)
            raw.flush()
            os.fsync(raw.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file (mkstemp's is private)
        os.replace(tmp, bundle)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pack(raw: BinaryIO, manifest: dict[str, Any], files: dict[str, Path], payloads: dict[str, bytes],
          runs_dir: Path, now: float) -> None:
    """The archive: the manifest first, then every member it lists, each hashed again as it is packed."""
    with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
        head = (json.dumps(manifest, indent=2) + "\n").encode()
        tar.addfile(_info(MANIFEST, len(head), now), io.BytesIO(head))
        for name, path in files.items():
            record = manifest["members"][name]
            with open(path, "rb") as fh:
                reader = _Hashing(fh)
                try:
                    tar.addfile(_info(name, record["size"], os.fstat(fh.fileno()).st_mtime), reader)
                except OSError as exc:  # shorter than when it was hashed
                    raise ResultsError(f"{path} changed while it was being exported ({exc}); export again when "
                                       f"no run is writing to {runs_dir}") from exc
                if reader.digest.hexdigest() != record["sha256"] or fh.read(1):
                    raise ResultsError(f"{path} changed while it was being exported; export again when no run "
                                       f"is writing to {runs_dir}")
        for name, payload in payloads.items():
            tar.addfile(_info(name, len(payload), now), io.BytesIO(payload))


# --- checking and unpacking ---------------------------------------------------------------------------


def _bad_name(name: str, folder: bool = False) -> str | None:
    """Why ``name`` cannot be a member of a bundle (None if it can); ``folder``: a directory member."""
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or "\\" in name or (path.parts and ":" in path.parts[0]):
        return "an absolute path"
    if ".." in path.parts:
        return "a path that leaves the bundle ('..')"
    if not path.parts or path.parts[0] not in TOPS or name != path.as_posix() or (len(path.parts) < 2 and not folder):
        return f"not a path under {' or '.join(t + '/' for t in TOPS)}"
    return None


def _check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """The manifest if this transferstudy can read the bundle it describes; otherwise why not, naming ``where``."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ResultsError(f"{where} is not a results bundle: its {MANIFEST} is not a {FORMAT}'s manifest; make one "
                           f"with `transferstudy export-results`")
    found, wrote = manifest.get("format_version"), manifest.get("written_by", {}).get("transferstudy", "?")
    if found != FORMAT_VERSION:
        raise ResultsError(f"{where} is in bundle format version {found!r} (written by transferstudy {wrote}), but "
                           f"this transferstudy ({version()}) reads version {FORMAT_VERSION} only; export the results "
                           f"again with this version, or build the book with transferstudy {wrote}")
    members, profile = manifest.get("members"), manifest.get("profile")
    if not isinstance(members, dict) or profile not in config.profiles() or not all(
            isinstance(m, dict) and isinstance(m.get("sha256"), str) and isinstance(m.get("size"), int)
            for m in members.values()):
        raise ResultsError(f"{where}: its {MANIFEST} is incomplete (members with sha256 and size, a known profile); "
                           f"export the results again")
    bad = [f"{name}: {why}" for name in members if (why := _bad_name(name))]
    if bad:
        raise ResultsError(f"{where} is refused: its {MANIFEST} lists " + "; ".join(bad))
    return manifest


def _refuse(where: str, problems: list[str], action: str) -> None:
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ResultsError(f"{where} is refused ({action}): " + "; ".join(shown)
                           + ". Export the results again (`transferstudy export-results`) and use the new bundle")


def _verify_tree(root: Path, manifest: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Every member of ``manifest`` under ``root`` with its size and checksum, and no other file there."""
    problems = []
    for name, record in manifest["members"].items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        with open(path, "rb") as fh:
            sha, size = _sha256(fh)
        if (sha, size) != (record["sha256"], record["size"]):
            problems.append(f"{name}: checksum mismatch")
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        name = path.relative_to(root).as_posix()
        if name != MANIFEST and name not in manifest["members"] and not any(
                path.relative_to(root).parts[:len(s)] == s for s in skip):
            problems.append(f"{name}: not in the manifest")
    return problems


def import_bundle(bundle: str | Path, to: str | Path) -> dict[str, Any]:
    """Check ``bundle`` and unpack it into the folder ``to`` (replacing an earlier import there); returns its
    manifest. The bundle is unpacked beside ``to`` and checked member by member first: a bundle that fails is
    refused, naming the member, and nothing is put in place."""
    bundle, to = Path(bundle), Path(to)
    where = str(bundle)
    if not bundle.is_file():
        raise ResultsError(f"{where} does not exist; pass a bundle written by `transferstudy export-results`")
    if to.exists() and not (to / MANIFEST).is_file() and (not to.is_dir() or any(to.iterdir())):
        raise ResultsError(f"--to {str(to)!r} exists and is not an unpacked results bundle; pass a new folder (or one "
                           f"an earlier import-results made, which is replaced)")
    to.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=to.parent, prefix=f".{to.name}.", suffix=".importing"))
    try:
        try:
            tar = tarfile.open(bundle, "r:*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise ResultsError(f"{where} is not a results bundle (not a tar archive: {exc}); make one with "
                               f"`transferstudy export-results`") from exc
        with tar:
            try:
                manifest_bytes, manifest = _unpack(tar, where, stage)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise ResultsError(f"{where} is damaged ({type(exc).__name__}: {exc}); nothing was unpacked. "
                                   f"Copy or export the bundle again") from exc
        _refuse(where, _verify_tree(stage, manifest), "nothing was unpacked")
        (stage / MANIFEST).write_bytes(manifest_bytes)
        old = to.with_name(f".{to.name}.old")
        if to.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(to, old)
        os.rename(stage, to)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _unpack(tar: tarfile.TarFile, where: str, stage: Path) -> tuple[bytes, dict[str, Any]]:
    """Read the manifest (the first member), then unpack every member it lists into ``stage``."""
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise ResultsError(f"{where} is not a results bundle: its first member is "
                           f"{'nothing' if first is None else repr(first.name)}, not {MANIFEST}; make one with "
                           f"`transferstudy export-results`")
    raw = tar.extractfile(first).read()
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise ResultsError(f"{where}: its {MANIFEST} is unreadable ({exc}); export the results again") from exc
    manifest = _check_manifest(manifest, where)
    problems, seen = [], set()
    for member in tar:
        if member is first:
            continue
        name = member.name
        record = manifest["members"].get(name)
        why = (_bad_name(name, member.isdir()) or ("a second copy of a member" if name in seen else None)
               or (None if member.isfile() or member.isdir() else "not a plain file")
               or (None if member.isdir() or record else "not in the manifest")
               or (None if member.isdir() or member.size == record["size"] else
                   f"checksum mismatch ({member.size:,} bytes, the manifest says {record['size']:,})"))
        seen.add(name)
        if why:
            problems.append(f"{name}: {why}")
            continue
        try:
            tar.extract(member, stage, filter="data")
        except tarfile.FilterError as exc:
            problems.append(f"{name}: {exc}")
    _refuse(where, problems, "nothing was unpacked")
    return raw, manifest


def open_results(folder: str | Path) -> tuple[dict[str, Any], Path, Path]:
    """An unpacked bundle (``import_bundle``), checked again against its manifest: (manifest, profile folder, data
    summary folder), what ``book.generate`` reads in place of the runs and the data root."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ResultsError(f"--results {str(folder)!r} is not an unpacked results bundle (no {MANIFEST}); unpack one "
                           f"with `transferstudy import-results BUNDLE.tar.gz --to {folder}`")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{folder / MANIFEST} is unreadable ({exc}); import the bundle again") from exc
    manifest = _check_manifest(manifest, str(folder))
    problems = _verify_tree(folder, manifest, skip=(DERIVED,))
    if problems:
        raise ResultsError(f"{folder} no longer matches its bundle's manifest: " + "; ".join(problems[:12])
                           + f". Import the bundle again (`transferstudy import-results BUNDLE --to {folder}`)")
    return manifest, folder / "runs" / manifest["profile"], folder / DATA_SUMMARY
