"""Where published adapter versions live on disk: one directory per server group.

A server group is keyed by its replica URLs, so two groups on one machine that publish the same name
never see or delete each other's versions. In a group's directory: ``NAME-vN-<random>`` per staged
version (an immutable copy: a trainer may overwrite its checkpoint dirs, while vLLM can re-read an
evicted adapter from its path at any time), ``NAME-vN-<random>.failed`` tombstones of rolled-back
attempts (a rolled-back name may have answered a request on one replica, so it is never used again),
a lock file per name, and ``urls.txt`` naming the group.

Permissions: the stage root must be a directory owned by the publishing user and not writable by group
or others (or another user could swap the files a server loads after they were validated). Staged
files are readable by group / others exactly when the root lets them through (its execute bits), so a
server running as another user can read them whatever the publisher's umask.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from vllm_train.errors import VllmTrainError
from vllm_train.lora.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def default_stage_root() -> Path:
    """$VLLM_TRAIN_STAGE_DIR, else a per-user directory in /dev/shm (or the temp dir)."""
    env = os.environ.get("VLLM_TRAIN_STAGE_DIR")
    if env:
        return Path(env)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return Path(shm) / f"vllm-train-adapters-{os.getuid()}"


class StageDir:
    """The staged versions of one server group (`urls`) under the stage root `root`."""

    def __init__(self, root: str | Path, urls: list[str]):
        self.root = Path(root).absolute()
        key = hashlib.sha256("\n".join(sorted(urls)).encode()).hexdigest()[:16]
        self.dir = self.root / f"group-{key}"
        self.urls = urls

    def open(self) -> StageDir:
        """Check the root (created with mode 755 if missing) and create this group's directory."""
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self.root.mkdir()
            os.chmod(self.root, 0o755)  # ours: servers running as other users may read the versions
        except FileExistsError:
            pass
        except OSError as exc:
            raise VllmTrainError(f"cannot create stage dir {self.root}: {exc}") from None
        st = os.lstat(self.root)
        fix = "pick another --stage-dir (or $VLLM_TRAIN_STAGE_DIR)"
        if not stat.S_ISDIR(st.st_mode):
            raise VllmTrainError(f"stage dir {self.root} is not a directory (a symlink or file); {fix}")
        if st.st_uid != os.getuid():
            raise VllmTrainError(f"stage dir {self.root} is owned by uid {st.st_uid}, not by you (uid "
                                 f"{os.getuid()}): its owner could swap the files a server loads; {fix}")
        if st.st_mode & 0o022:
            raise VllmTrainError(f"stage dir {self.root} is writable by group or others (mode "
                                 f"{stat.S_IMODE(st.st_mode):o}): they could swap the files a server loads; "
                                 f"run chmod go-w on it or {fix}")
        group_x, other_x = st.st_mode & stat.S_IXGRP, st.st_mode & stat.S_IXOTH
        self.dir_mode = 0o700 | (0o050 if group_x else 0) | (0o005 if other_x else 0)
        self.file_mode = 0o600 | (0o040 if group_x else 0) | (0o004 if other_x else 0)
        self.dir.mkdir(exist_ok=True)
        os.chmod(self.dir, self.dir_mode)
        urls_file = self.dir / "urls.txt"
        if not urls_file.exists():
            urls_file.write_text("\n".join(self.urls) + "\n")
            os.chmod(urls_file, self.file_mode)
        return self

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """One publisher per (server group, name) at a time, across processes on this host."""
        import fcntl

        with open(self.dir / f".{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _entries(self, name: str) -> Iterator[tuple[int, Path, bool]]:
        """(version, path, is_tombstone) of every staged version of `name`."""
        pattern = re.compile(rf"^{re.escape(name)}-v(\d+)-[0-9a-f]+(\.failed)?$")
        for path in self.dir.glob(f"{name}-v*"):
            m = pattern.match(path.name)
            if m:
                yield int(m[1]), path, bool(m[2])

    def live(self, name: str) -> dict[int, Path]:
        """Staged (not rolled-back) versions of `name`: what this group published and did not retire."""
        return {v: p for v, p, dead in self._entries(name) if not dead and p.is_dir()}

    def used_versions(self, name: str) -> set[int]:
        """Every version number this group ever staged for `name`, rolled-back attempts included."""
        return {v for v, _, _ in self._entries(name)}

    def stage(self, adapter_dir: str | Path, name: str, version: int) -> Path:
        """Copy the adapter's two files into a new ``NAME-vN-<random>`` directory (temp dir + rename)."""
        target = self.dir / f"{name}-v{version}-{uuid.uuid4().hex[:8]}"
        tmp = self.dir / f".tmp-{target.name}"
        try:
            tmp.mkdir()
            os.chmod(tmp, self.dir_mode)
            for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copyfile(Path(adapter_dir) / f, tmp / f)
                os.chmod(tmp / f, self.file_mode)
            os.replace(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise VllmTrainError(f"cannot stage {adapter_dir} into {self.dir}: {exc}") from None
        return target

    def tombstone(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)
        with contextlib.suppress(OSError):
            staged.with_name(staged.name + ".failed").touch()

    def retire(self, name: str, keep: set[int]) -> None:
        """Delete the staged copies of versions of `name` not in `keep` (tombstones stay)."""
        for version, path, dead in self._entries(name):
            if not dead and version not in keep:
                shutil.rmtree(path, ignore_errors=True)


# ---- an in-process engine's adapter copies (`VLLMEngine._sync_public`) ----------------------------
SYNC_COPY_PREFIX = "vllm-train-adapter-"  # + "<pid>-<random>": the pid tells a dead owner's copies apart


def sync_copy_dir(root: str | Path | None = None) -> tempfile.TemporaryDirectory:
    """A fresh temp dir (on tmpfs where there is one) for an adapter version the engine loads from disk.
    Copies left by processes of this user that died (kill -9 skips their cleanup) are removed first."""
    if root is None:
        root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    remove_dead_sync_copies(root)
    return tempfile.TemporaryDirectory(prefix=f"{SYNC_COPY_PREFIX}{os.getpid()}-", dir=root)


def remove_dead_sync_copies(root: str | Path) -> list[Path]:
    """Delete this user's ``vllm-train-adapter-<pid>-*`` dirs under `root` whose process is gone."""
    removed = []
    for path in Path(root).glob(f"{SYNC_COPY_PREFIX}*-*"):
        match = re.fullmatch(re.escape(SYNC_COPY_PREFIX) + r"(\d+)-.+", path.name)
        try:
            if match is None or path.is_symlink() or path.lstat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
