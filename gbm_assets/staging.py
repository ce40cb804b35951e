"""Stage now, commit later: an asset's outputs appear together, and only once it has logged them.

An asset that writes several files and logs to MLflow must not replace any of its previous
files until the logging succeeded (a locked or unreachable MLflow store would otherwise leave
new files on disk and no run that explains them). Staging writes each output into a hidden
folder beside its final path (same directory, so the later os.replace is an atomic rename
and the staged file keeps the final file's name, which is what MLflow logs it under):

    <folder>/.staged-<host>.<pid>.<random>/<name>   ->   <folder>/<name>

    with Staging() as stage:
        write_table(stage.path(labels_file))
        write_page(stage.path(explorer_file))
        log_everything_to_mlflow(...)              # raises: nothing above replaced anything
        stage.commit([labels_file, explorer_file])  # swapped in, one file after another, in this order

Leaving the block without commit() (an exception, or a plain return) deletes every staged file;
the previous outputs stay byte for byte as they were. Readers that open several outputs see a
mix of old and new files only inside commit(), between two renames; callers choose the order
so that such a mix is detectable or harmless (clusters: model, then labels, then explorer).
Staging folders of a process of this host that died (SIGKILL) are removed the next time the
same folder is staged into.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from gbm_assets.storage import host_tag, pid_alive

PREFIX = ".staged-"


def remove_dead_stages(folder: str | Path) -> list[Path]:
    """Delete staging folders in folder left by processes of this host that no longer run; return them.

    Folders of live processes, and of other hosts (whose processes this host cannot see, e.g.
    on a shared network folder), are left alone.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    host = host_tag()
    for entry in folder.glob(f"{PREFIX}*"):
        match = re.fullmatch(r"(?P<host>[A-Za-z0-9-]{1,32})\.(?P<pid>\d{1,10})\.[0-9a-f]{8}", entry.name[len(PREFIX) :])
        if not match or match["host"] != host or not entry.is_dir():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _replace_tree(staged: Path, final: Path, last: tuple[str, ...], prune: bool) -> None:
    files = sorted(p.relative_to(staged) for p in staged.rglob("*") if p.is_file())
    files.sort(key=lambda rel: rel.as_posix() in last)  # stable: `last` ones at the end
    final.mkdir(parents=True, exist_ok=True)
    for rel in files:
        (final / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / rel, final / rel)
    if prune:
        keep = {final / rel for rel in files}
        for old in sorted(final.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if any(part.startswith(".") for part in old.relative_to(final).parts):
                continue  # hidden: other writers' temporary and staged files
            if old.is_file() and old not in keep:
                old.unlink()
            elif old.is_dir() and not any(old.iterdir()):
                old.rmdir()


class Staging:
    """Staged outputs of one materialization; see the module docstring."""

    def __init__(self) -> None:
        self._token = f"{PREFIX}{host_tag()}.{os.getpid()}.{secrets.token_hex(4)}"
        self._staged: dict[Path, Path] = {}  # final -> staged
        self._removals: list[Path] = []
        self._trees: dict[Path, tuple[tuple[str, ...], bool]] = {}  # final folder -> (last, prune)
        self._dirs: list[Path] = []
        self.committed = False

    def path(self, final: str | Path) -> Path:
        """Where to write the new version of final (a file path); its folders are created."""
        final = Path(final).absolute()
        if final in self._staged:
            return self._staged[final]
        folder = final.parent / self._token
        if folder not in self._dirs:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_dead_stages(final.parent)
            folder.mkdir()
            self._dirs.append(folder)
        self._staged[final] = folder / final.name
        return self._staged[final]

    def directory(self, final_dir: str | Path, last: Sequence[str] = (), prune: bool = True) -> Path:
        """A staged folder that replaces final_dir's files on commit (final_dir is a folder path).

        On commit every file under the staged folder is moved to the same relative path under
        final_dir, those whose relative path is in `last` after all others (e.g. the page that
        refers to the rest); with prune, files under final_dir that the new version does not
        have are deleted afterwards (outputs of an earlier run that no longer exist).
        """
        staged = self.path(final_dir)
        staged.mkdir(exist_ok=True)
        self._trees[Path(final_dir).absolute()] = (tuple(last), prune)
        return staged

    def remove_on_commit(self, final: str | Path) -> None:
        """Delete final (if it exists) at commit time, after the staged files are in place."""
        self._removals.append(Path(final).absolute())

    def commit(self, order: Iterable[str | Path] = ()) -> list[Path]:
        """Move every staged file over its final path: first those named in order, in that order,
        then the rest in staging order; then apply remove_on_commit. Returns the finals written.

        A final that was staged but never written raises FileNotFoundError before anything moves.
        """
        finals = [Path(p).absolute() for p in order]
        unknown = [p for p in finals if p not in self._staged]
        if unknown:
            raise KeyError(f"not staged: {', '.join(map(str, unknown))}")
        finals += [p for p in self._staged if p not in finals]
        missing = [str(self._staged[p]) for p in finals if not self._staged[p].exists()]
        if missing:
            raise FileNotFoundError(f"staged outputs were never written: {', '.join(missing)}")
        for final in finals:
            if final in self._trees:
                _replace_tree(self._staged[final], final, *self._trees[final])
            else:
                os.replace(self._staged[final], final)
        for final in self._removals:
            if final not in self._staged:
                final.unlink(missing_ok=True)
        self.committed = True
        self._cleanup()
        return finals

    def discard(self) -> None:
        """Delete every staged file; the finals are untouched."""
        self._cleanup()

    def _cleanup(self) -> None:
        for folder in self._dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._dirs.clear()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._cleanup()
        return False
