"""Writing a checkpoint piece by piece (the converter's side of `weights.checkpoint`'s layout): a temporary
sibling directory, Orbax partial saves, a journal that makes an interrupted conversion resumable, and the
final rename to DST."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

from .checkpoint import JOURNAL, MANIFEST, PARAMS, nest, orbax_context, to_disk

log = logging.getLogger(__name__)


def temporary_path(dst: str | os.PathLike) -> str:
    """The temporary sibling `.<name>.converting` that a checkpoint is written into before it becomes `dst`."""
    dst = os.path.abspath(os.fspath(dst))
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.converting")


class CheckpointWriter:
    """Writes a checkpoint piece by piece into a temporary sibling of DST, renamed to DST once complete.

    The temporary directory (`.<DST name>.converting` beside DST) holds the Orbax partial-save session
    and a journal of the finished pieces and of `identity` (source checksum, dtype, ...). A conversion
    that fails or is killed leaves no DST; `resume=True` continues from the journal, provided the
    identity is the same. An existing DST is refused unless `overwrite`, and is replaced only when the
    new checkpoint is complete and verified.
    """

    def __init__(self, dst: str | os.PathLike, identity: dict[str, Any], overwrite: bool = False, resume: bool = False) -> None:
        self.dst = os.path.abspath(os.fspath(dst))
        self.tmp = temporary_path(self.dst)
        self.identity = identity
        if os.path.lexists(self.dst) and not overwrite:
            raise FileExistsError(f"{self.dst} already exists; pass --overwrite to replace it")
        if os.path.exists(self.tmp) and not resume:
            if not overwrite:
                raise FileExistsError(
                    f"an interrupted conversion is in {self.tmp}: pass --resume to continue it or --overwrite to start over"
                )
            shutil.rmtree(self.tmp)
        if os.path.exists(self.tmp):
            self.journal = self._read_journal()
        else:
            if resume:
                log.info("nothing to resume at %s; starting a new conversion", self.tmp)
            os.makedirs(self.tmp)
            self.journal = {"identity": identity, "done": [], "pending": None}
            self._write_journal()

    @property
    def params_path(self) -> str:
        return os.path.join(self.tmp, PARAMS)

    def _read_journal(self) -> dict[str, Any]:
        path = os.path.join(self.tmp, JOURNAL)
        try:
            with open(path) as f:
                journal = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot resume from {self.tmp}: unreadable journal ({e}); pass --overwrite to start over") from None
        for key, value in self.identity.items():
            if journal["identity"].get(key) != value:
                raise ValueError(
                    f"cannot resume from {self.tmp}: it was started with {key}={journal['identity'].get(key)!r}, "
                    f"now {value!r}; pass --overwrite to start over"
                )
        log.info("resuming %s: %d pieces already written", self.tmp, len(journal["done"]))
        return journal

    def _write_journal(self) -> None:
        path = os.path.join(self.tmp, JOURNAL)
        with open(path + ".tmp", "w") as f:
            json.dump(self.journal, f, indent=1)
        os.replace(path + ".tmp", path)

    def done(self, piece: str) -> bool:
        return piece in self.journal["done"]

    def save(self, piece: str, tree: dict[str, Any], after_save: Callable[[], None] | None = None) -> None:
        """Write one piece (numpy arrays and `QuantArray`s of them, not modified until this returns) as an
        Orbax partial save."""
        resumed = self.journal["pending"] == piece
        self.journal["pending"] = piece
        self._write_journal()
        with orbax_context() as ocp:
            try:
                ocp.partial.save(self.params_path, nest(piece, to_disk(tree)))
            except Exception as e:
                # Killed after Orbax committed this piece but before the journal recorded it: it is on disk.
                if not (resumed and type(e).__name__ == "PartialSaveReplacementError"):
                    raise
                log.info("piece %s was already written before the interruption", piece)
        if after_save is not None:
            after_save()
        self.journal["done"].append(piece)
        self.journal["pending"] = None
        self._write_journal()

    def finalize(self) -> None:
        """Finalise the Orbax checkpoint once every piece is saved (done already: nothing to do)."""
        if not os.path.exists(self.params_path):
            with orbax_context() as ocp:
                ocp.partial.finalize(self.params_path)
        for entry in os.listdir(self.tmp):
            if "orbax-checkpoint-tmp" in entry:  # left by a save interrupted before it committed
                shutil.rmtree(os.path.join(self.tmp, entry), ignore_errors=True)

    def finish(self, files: dict[str, str], json_files: dict[str, Any], manifest_fn: Callable[[str], dict[str, Any]]) -> str:
        """`finalize`, copy `files` ({name in DST: source path}), write `json_files` ({name: object}), run
        `manifest_fn(tmp)` (verifies, returns the manifest, written last), then rename the temporary
        directory to DST."""
        self.finalize()
        for name, src in files.items():
            shutil.copyfile(src, os.path.join(self.tmp, name))
        for name, obj in json_files.items():
            _write_json(os.path.join(self.tmp, name), obj)
        manifest = manifest_fn(self.tmp)
        os.remove(os.path.join(self.tmp, JOURNAL))
        _write_json(os.path.join(self.tmp, MANIFEST), manifest)
        if os.path.lexists(self.dst):
            old = self.tmp + ".old"
            os.rename(self.dst, old)
            os.rename(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.dst)
        log.info("wrote %s", self.dst)
        return self.dst


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
