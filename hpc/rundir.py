"""The run directory: recipe snapshot, run.json, per-stage outputs, logs, progress and completion markers.

Permissions: hpcft processes create files under the umask $HPCFT_UMASK (octal, default 077: directories
0700, files 0600), so a run directory on a shared cluster filesystem is not readable by other users; jobs
inherit it (sbatch passes the umask to the job). The recipe snapshot keeps the values the jobs need
(`executor.env`, `setup:` lines, a tracking URI with a password) and is always 0600. run.json holds no
secret in clear: a value that data_tools.secrets redacts is written redacted, and the real one goes to the
0600 file `.run.private.json` beside it, which read_meta merges back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from hpc.plan import StageSpec
from hpc.recipe import Recipe, RecipeError, parse_recipe


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    def inside(self, path: Path | str, what: str = "path", under: Path | None = None) -> Path:
        """`path` (relative to the run directory, or absolute) made absolute, when it stays inside the run
        directory (or `under`, a directory in it); else RecipeError('<what>: ...'). Compared after resolving
        '.' and '..' but not symlinks: a stages/ folder linked to scratch space is still the run's."""
        base = Path(os.path.normpath(under if under is not None else self.root))
        full = Path(os.path.normpath(self.root / path))
        if full != base and base not in full.parents:
            raise RecipeError([f"{what}: {str(path)!r} leads outside {base}"])
        return full

    def relative(self, path: Path | str) -> str:
        """How a path is stored in the run's own files: relative to the run directory when it is inside it
        (the directory can then be moved or copied), else absolute."""
        full = Path(os.path.abspath(path))
        try:
            return str(full.relative_to(self.root))
        except ValueError:
            return str(full)

    def resolve(self, stored: str, under: str | None = None) -> Path:
        """A path read from the run's own files, made absolute: a relative one against the current root; an
        absolute one as it is while it exists, else, when it ends in `under/...` (it was inside an earlier
        place of this run directory, written before paths were stored relative), the same part here."""
        p = Path(stored)
        if not p.is_absolute():
            return self.root / p
        if p.exists() or under is None:
            return p
        parts, marker = p.parts, Path(under).parts
        for i in range(len(parts) - len(marker), -1, -1):
            if parts[i : i + len(marker)] == marker:
                moved = self.root.joinpath(*parts[i:])
                if moved.exists():
                    return moved
        return p

    def stage_dir(self, name: str) -> Path:
        """<root>/stages/<name>; RecipeError for a name that is not one plain directory name (stage names are
        checked by the recipe; this guards every other way a name gets here, e.g. `hpcft logs NAME`)."""
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name or "\0" in name:
            raise RecipeError([f"stage: {name!r} is not a stage name (one directory under {self.root / 'stages'})"])
        return self.inside(Path("stages") / name, "stage", under=self.root / "stages")

    def element_dir(self, spec: StageSpec, index: int) -> Path:
        """Outputs of one array element (the stage dir itself for single jobs); eval element keys such as
        'yaml:/abs/dir:task@candidate' nest under the stage dir and never leave it."""
        d = self.stage_dir(spec.name)
        return self.inside(d / spec.elements[index], f"{spec.name} element", under=d) if spec.is_array else d

    def progress_path(self, name: str) -> Path:
        return self.stage_dir(name) / "progress.jsonl"

    # run.json ---------------------------------------------------------------------------------
    def read_meta(self) -> dict:
        p, private = self.root / "run.json", self.root / PRIVATE_META
        meta = json.loads(p.read_text()) if p.is_file() else {}
        return meta | (json.loads(private.read_text()) if private.is_file() else {})

    def update_meta(self, **fields) -> dict:
        """Merge `fields` into run.json; top-level values holding a secret (a tracking URI with a password)
        are written redacted there and kept whole in the private file."""
        from data_tools.secrets import redact

        meta = self.read_meta() | fields
        shown = redact(meta, REDACTED)
        hidden = {k: v for k, v in meta.items() if shown[k] != v}
        if hidden or (self.root / PRIVATE_META).exists():
            atomic_write(self.root / PRIVATE_META, json.dumps(hidden, indent=2, sort_keys=True), mode=0o600)
        write_json(self.root / "run.json", shown)
        return meta

    def write_recipe(self, recipe: Recipe) -> None:
        """The resolved recipe, loadable to rerun the run; 0600, since it keeps secrets the jobs need."""
        make_private_dir(self.root)
        atomic_write(self.recipe_path, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), mode=0o600)

    def load_recipe(self) -> Recipe:
        """The run's recipe snapshot; RecipeError('workdir: ...') when it is missing or not a recipe."""
        try:
            raw = yaml.safe_load(self.recipe_path.read_text())
        except OSError as err:
            raise RecipeError([f"workdir: cannot read the run's recipe {self.recipe_path}: {err.strerror}"]) from None
        except yaml.YAMLError:
            raise RecipeError([f"workdir: the run's recipe {self.recipe_path} is not valid YAML"]) from None
        try:
            return parse_recipe(raw)
        except RecipeError as err:
            raise RecipeError([f"workdir: {self.recipe_path}: {line}" for line in err.problems]) from None

    def embedded_uri(self) -> str:
        """The MLflow store inside the run directory (the default tracking URI)."""
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def follow_move(self) -> Path | None:
        """When run.json names the embedded MLflow store of another place (this directory was moved or copied
        there from it): point the store's artifact locations here (MLflow keeps them absolute, and would write
        artifacts into the old place) and run.json's tracking URI; returns the old place, else None. Only
        for the embedded store: call it when the recipe's tracking URI resolves to embedded_uri()."""
        import sqlite3

        uri, prefix = self.read_meta().get("tracking_uri", ""), "sqlite:///"
        old_db = Path(uri[len(prefix) :]) if uri.startswith(prefix) else None
        db = self.root / "mlflow.db"
        if old_db is None or old_db.name != "mlflow.db" or old_db.parent == self.root or not db.is_file():
            return None
        old = old_db.parent
        con = sqlite3.connect(db)
        try:
            with con:
                for table, column in (
                    ("experiments", "artifact_location"),
                    ("runs", "artifact_uri"),
                    ("model_versions", "source"),
                    ("model_versions", "storage_location"),
                ):
                    if column not in [row[1] for row in con.execute(f"PRAGMA table_info({table})")]:
                        continue
                    for was, now in ((old.as_uri(), self.root.as_uri()), (str(old), str(self.root))):
                        con.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                            (now, len(was) + 1, was, len(was) + 1, was + "/"),
                        )
        finally:
            con.close()
        self.update_meta(tracking_uri=self.embedded_uri())
        return old

    # markers ----------------------------------------------------------------------------------
    def _marker(self, spec: StageSpec, index: int) -> Path:
        return self.stage_dir(spec.name) / "markers" / f"{index}.done"

    def mark_done(self, spec: StageSpec, index: int) -> None:
        write_json(self._marker(spec, index), {"input_hash": spec.input_hash, "finished": time.time()})

    def element_done(self, spec: StageSpec, index: int) -> bool:
        p = self._marker(spec, index)
        return p.is_file() and json.loads(p.read_text()).get("input_hash") == spec.input_hash

    def stage_done(self, spec: StageSpec) -> bool:
        return all(self.element_done(spec, i) for i in range(len(spec.elements)))

    def clear_markers(self, spec: StageSpec) -> None:
        for p in (self.stage_dir(spec.name) / "markers").glob("*.done"):
            p.unlink()


PRIVATE_META = ".run.private.json"
REDACTED = "***"


def hpcft_umask() -> int:
    """The umask hpcft creates run files under: $HPCFT_UMASK (octal, e.g. 027 to share with the group),
    default 077 (directories 0700, files 0600)."""
    raw = os.environ.get("HPCFT_UMASK", "077")
    try:
        value = int(raw, 8)
    except ValueError:
        raise ValueError(f"HPCFT_UMASK={raw!r}: expected an octal umask such as 077 or 027") from None
    if not 0 <= value <= 0o777:
        raise ValueError(f"HPCFT_UMASK={raw!r}: expected an octal umask such as 077 or 027")
    return value


def private_umask() -> int:
    """Set this process's umask to hpcft_umask() (children and submitted jobs inherit it); returns the old."""
    return os.umask(hpcft_umask())


def make_private_dir(path: Path) -> Path:
    """mkdir -p; a directory created here gets 0777 & ~hpcft_umask() (0700 by default), whatever the
    process umask; an existing one is left as it is."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777 & ~hpcft_umask())
    return path


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file that may hold secrets: `mode` (0600 by default) whatever the umask."""
    atomic_write(Path(path), text, mode=mode)


def atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    """Write via a temp file + rename so a reader never sees a half-written file; `mode`: exact permissions
    (set before any content is written), else the umask's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if mode is None:
        tmp.write_text(text)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# the run lock ---------------------------------------------------------------------------------
LOCK = ".lock"
HEARTBEAT_S = 30.0  # the holder touches the lock file this often
STALE_AFTER_S = 300.0  # a lock from another host untouched for this long is stale (its holder is gone)


class RunLock:
    """One writer per run directory: `hpcft run` holds `<run dir>/.lock` ({host, pid, pid_start, dir, run_id,
    since}) while it runs. Taken with O_CREAT|O_EXCL, which is atomic on local filesystems and on NFS v3+ and
    Lustre, where flock may not work; an flock on the open file is a second guard where it does. A lock is
    stale, and taken over, when its holder ran on this host and that pid is gone or is another process (start
    time, /proc/<pid>/stat field 22), when it was copied from another directory, or when it ran on another
    host and the file was not touched for STALE_AFTER_S (a live holder touches it every HEARTBEAT_S from a
    daemon thread). Readers (`hpcft status`, `watch`, `logs`) take no lock."""

    def __init__(self, root: Path, command: str = "hpcft run"):
        self.root = Path(root)
        self.path = self.root / LOCK
        self.command = command
        self.fd: int | None = None
        self.note: str | None = None  # the line saying a stale lock was taken over, if one was
        self._stop = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def stale(self, holder: dict | None) -> str | None:
        """Why the lock on disk no longer stands (taking it over is safe), or None when it does."""
        import socket

        from hpc.lifeline import same_process

        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        if not isinstance(holder, dict):  # being written right now, or a torn leftover
            return "it is unreadable and old" if age > 10 else None
        if holder.get("dir") not in (None, str(self.root)):
            return f"it was copied from {holder.get('dir')}"
        if holder.get("host") == socket.gethostname():
            if not same_process(int(holder.get("pid", -1)), holder.get("pid_start")):
                return "that process is no longer running"
            return None
        if age > STALE_AFTER_S:
            return f"it was last touched {age / 60:.0f} min ago"
        return None

    def acquire(self, run_id: str | None = None) -> RunLock:
        """Take the lock or raise RecipeError naming the holder; `self.note` says if a stale one was replaced."""
        import socket

        from hpc.lifeline import start_time

        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.holder()
                why = self.stale(holder)
                if why is None:
                    raise RecipeError([self.held_message(holder)]) from None
                if self.holder() != holder:  # it changed while we looked: judge again
                    continue
                self._take_over(holder, why)
                continue
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process holds this very file: O_EXCL did not hold here
                os.close(fd)
                raise RecipeError([self.held_message(self.holder())]) from None
            except (ImportError, OSError):  # no flock on this filesystem: O_EXCL alone
                pass
            self.fd = fd
            self.info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start": start_time(os.getpid()),
                "dir": str(self.root),
                "command": self.command,
                "run_id": run_id,
                "since": time.time(),
            }
            os.write(fd, json.dumps(self.info).encode())
            os.fsync(fd)
            self._start_heartbeat()
            return self
        raise RecipeError([f"workdir: {self.root}: could not take its lock {self.path}; try again"])

    def _take_over(self, holder: dict | None, why: str) -> None:
        """Move the stale lock aside (a rename: of two takers only one wins it) and remove it. The holder is
        read again just before (acquire), which narrows, but does not close, the window in which a second
        taker could move aside a lock the first one has just created."""
        aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        who = _describe_holder(holder) if isinstance(holder, dict) else "an unknown holder"
        self.note = f"workdir: took over the lock of {self.root} from {who}: {why}"

    def held_message(self, holder: dict | None) -> str:
        who = _describe_holder(holder) if isinstance(holder, dict) else "another hpcft process"
        return f"workdir: {self.root} is in use by {who}; wait for it, or stop it"

    def update(self, **fields) -> None:
        """Rewrite the lock's record (e.g. the run id, once known); only while held."""
        if self.fd is None:
            return
        self.info |= fields
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self.info).encode(), 0)

    def _start_heartbeat(self) -> None:
        import threading

        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        threading.Thread(target=beat, name="hpcft-lock-heartbeat", daemon=True).start()
        self._stop = stop

    def release(self) -> None:
        if self.fd is None:
            return
        if self._stop is not None:
            self._stop.set()
        mine = self.holder()
        if isinstance(mine, dict) and mine.get("pid") == os.getpid() and mine.get("since") == self.info["since"]:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(holder: dict) -> str:
    since = holder.get("since")
    when = time.strftime("%H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"{holder.get('command', 'hpcft run')} (pid {holder.get('pid')} on host {holder.get('host')} since {when})"
