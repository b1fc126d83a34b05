"""Where a run's images go, and the record that lets an interrupted run finish.

Names. A plain run keeps the reference layout: OUTDIR/samples/NNNNN.png under the next free numbers.
A run with --skip-existing or with scale-out flags names image k `base + k` instead, where `base` is
fixed when the run starts (after every existing sample and every number an earlier unfinished run has
reserved) and written into the run's manifest. A resumed run finds its manifest again by the run id, a
hash of every image's "parameters" text and batch place, so it reuses the same base and the same names,
whichever number of processes runs it. When nothing else writes into the folder meanwhile, the plain
run's names are base + k too, so a plain run that was interrupted can be finished with --skip-existing.

Manifest. OUTDIR/manifest-BBBBB.jsonl (BBBBB = base): a header line {"sd_manifest": 1, "run", "base",
"images", ...}, then one line per image written {"item", "file", "seed", "prompt", "batch", "rank",
"batch_seconds", ...} and one {"event": "end", ...} line per finished attempt. Processes other than
rank 0 write their lines into hidden part files (.manifest-BBBBB.rankR.jsonl) that rank 0 merges at the
end, so no two processes (possibly on two machines sharing a file system) append to one file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from PIL import Image

from ldm.files import imageio, metadata
from ldm.errors import SDError, note
from ldm.limits import is_whole

if TYPE_CHECKING:
    from ldm.batch.job import BatchJob
    from ldm.pipeline import Session
    from ldm.plan import Batch

MANIFEST_PREFIX = "manifest-"
MANIFEST_VERSION = 1


def sample_name(number: int) -> str:
    return f"{number:0{imageio.SAMPLE_DIGITS}d}.png"


def prepare_outdir(outdir: str | os.PathLike) -> Path:
    """Create OUTDIR/samples and prove it writable (SDError otherwise); returns the samples folder."""
    return imageio.ensure_writable_dir(Path(outdir) / "samples")


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """Write `data` at the end of the file open as `fd` (O_APPEND) in whole or not at all.

    A full disk can make write() store part of a line; the file is then cut back to where it was, so a
    reader never meets a torn line that a later append would glue onto.
    """
    before = os.fstat(fd).st_size
    try:
        written = os.write(fd, data)
        while written < len(data):  # a short write: retry the rest, which reports the real error
            more = os.write(fd, data[written:])
            if more == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written += more
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, before)
        raise SDError(f"cannot write {path}: {exc.strerror or exc}") from None


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line with one write() on an O_APPEND descriptor (no torn or mixed lines).

    A file whose last line was cut short by a crash gets a line break first, so the new line stays whole.
    """
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise SDError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        _write_all(fd, line, path)
    finally:
        os.close(fd)


# A manifest is a small text file; anything larger is not one of ours (and is not read whole).
MAX_MANIFEST_BYTES = 64 * 2**20


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON Lines file, whatever else it holds: a line cut short by a crash, bytes
    that are not UTF-8, a value nested too deep, or a non-object line is left out; a missing, unreadable
    or oversized file reads as empty."""
    from ldm.files.reading import read_capped

    try:
        text = read_capped(path, MAX_MANIFEST_BYTES, "manifest").decode("utf-8", errors="replace")
    except SDError:  # missing, unreadable, oversized, or not a regular file (a FIFO must not hang the run)
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def manifests(outdir: Path) -> list[tuple[Path, dict]]:
    """(path, header) of every readable run manifest in `outdir`, oldest base first; a manifest whose
    header is missing or malformed (a kill or a full disk at its creation) is passed over."""
    found = []
    for path in sorted(Path(outdir).glob(f"{MANIFEST_PREFIX}*.jsonl")):
        records = read_jsonl(path)
        header = records[0] if records else {}
        if (header.get("sd_manifest") and is_whole(header.get("base"), 0, imageio.MAX_INDEX)
                and is_whole(header.get("images"), 0, imageio.MAX_INDEX) and isinstance(header.get("run"), str)):
            found.append((path, header))
    return found


_MANIFEST_NAME = re.compile(rf"{MANIFEST_PREFIX}(\d{{1,{imageio.MAX_INDEX_DIGITS}}})\.jsonl")


def next_base(outdir: Path) -> int:
    """The first sample number after every existing sample and every range a run's manifest reserves.

    A manifest file reserves at least its own number, whatever it holds, so that no new manifest is ever
    asked to take a name that exists.
    """
    reserved = [header["base"] + header["images"] for _, header in manifests(outdir)]
    with contextlib.suppress(OSError):
        for name in os.listdir(outdir):
            match = _MANIFEST_NAME.fullmatch(name)
            if match:
                reserved.append(int(match.group(1)) + 1)
    return max([imageio.next_index(Path(outdir) / "samples", imageio.SAMPLE_DIGITS), *reserved])


def create_manifest(outdir: Path, header: dict) -> tuple[Path, int]:
    """Reserve a base and write the manifest's header line; returns (path, base).

    The header goes in with one write; if it cannot be written whole (a full disk) the file is removed.
    """
    for _ in range(1000):
        base = next_base(outdir)
        path = Path(outdir) / f"{MANIFEST_PREFIX}{base:05d}.jsonl"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another run took this base a moment ago: look again
            continue
        except OSError as exc:
            raise SDError(f"cannot write {path}: {exc.strerror or exc}") from None
        line = json.dumps({"sd_manifest": MANIFEST_VERSION, **header, "base": base}, ensure_ascii=False) + "\n"
        try:
            _write_all(fd, line.encode("utf-8"), path)
        except SDError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        return path, base
    raise SDError(f"cannot reserve a manifest in {outdir}: other runs keep taking the names")


def part_path(manifest: Path, rank: int) -> Path:
    """Where process `rank` writes its manifest lines: the manifest itself for rank 0."""
    return manifest if rank == 0 else manifest.with_name(f".{manifest.stem}.rank{rank}.jsonl")


def merge_parts(manifest: Path) -> None:
    """Append the other processes' manifest lines (in item order) to the manifest and remove the parts."""
    parts = sorted(manifest.parent.glob(f".{manifest.stem}.rank*.jsonl"))
    records = [r for part in parts for r in read_jsonl(part)]
    for record in sorted(records, key=lambda r: r["item"] if is_whole(r.get("item")) else 0):
        append_jsonl(manifest, record)
    for part in parts:
        part.unlink(missing_ok=True)


def run_id(session: "Session", plan: list["Batch"]) -> str:
    """A hash of what the run's images are: each image's parameters text and place in its batch."""
    digest = hashlib.sha256()
    for batch in plan:
        for pos in batch.kept():
            digest.update(f"{batch.index}/{pos}/{len(batch.items)}/{batch.items[pos].index}\0".encode())
            digest.update(session.parameters(batch, pos).encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


@dataclass
class RunState:
    """What rank 0 decides before sampling and every process then follows (it is broadcast as is)."""
    run: str  # run id
    base: int  # image k is named base + k (indexed names)
    manifest: str
    indexed: bool
    todo: list[int]  # plan batches still to sample, in plan order
    present: list[int] = field(default_factory=list)  # items whose file is already there (--skip-existing)
    total: int = 0  # images the plan saves
    had_grid: bool = False  # a previous attempt of this run made its grid


def begin_run(job: "BatchJob", session: "Session", plan: list["Batch"], processes: int = 1) -> RunState:
    """Rank 0: find or create the run's manifest, fix the base, and list what is left to do."""
    outdir = Path(job.outdir)
    samples = prepare_outdir(outdir)
    rid = run_id(session, plan)
    total = sum(len(batch.kept()) for batch in plan)
    found = next(((p, h) for p, h in manifests(outdir) if h.get("run") == rid), None) if job.skip_existing else None
    if found is None:
        header = {"run": rid, "images": total, "batches": len(plan),
                  "names": "base+k" if job.indexed_names else "sequential", "mode": session.task.name,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "processes": processes}
        path, base = create_manifest(outdir, header)
        return RunState(rid, base, str(path), job.indexed_names, [b.index for b in plan], [], total)
    path, header = found
    base = header["base"]
    _remove_stale_temps(samples, base, total)
    present, todo = [], []
    for batch in plan:
        missing = False
        for pos in batch.kept():
            item = batch.items[pos]
            target = samples / sample_name(base + item.index)
            if not target.exists():
                missing = True
                continue
            if metadata.read_png_text(target).get(metadata.PARAMETERS_KEY) != session.parameters(batch, pos):
                raise SDError(f"{target} exists but is not image {item.index} of this run (its parameters differ); "
                              "move it away or use another --outdir")
            present.append(item.index)
        if missing:
            todo.append(batch.index)
    had_grid = any(r.get("grid") for r in read_jsonl(path))
    return RunState(rid, base, str(path), True, todo, present, total, had_grid)


def _remove_stale_temps(samples: Path, base: int, total: int) -> None:
    """Hidden temp files of this run's names left by a process that was killed mid-write."""
    for tmp in samples.glob(".*.tmp"):
        stem = tmp.name[1:].split(".", 1)[0]
        if stem.isdigit() and base <= int(stem) < base + total:
            tmp.unlink(missing_ok=True)


class PlanRunner:
    """Samples this process's share of the plan's batches and saves their images.

    Processes take whole batches (rank r the batches todo[r::world]), so every image is computed in
    the batch and at the position the plan gave it, whatever the number of processes.
    """

    def __init__(self, job: "BatchJob", session: "Session", plan: list["Batch"], state: RunState, rank: int = 0,
                 world: int = 1):
        from tqdm import tqdm

        self.job, self.session, self.plan, self.state, self.rank = job, session, plan, state, rank
        self.share = state.todo[rank::world]
        self.outdir = Path(job.outdir)
        self.samples = self.outdir / "samples"
        self.manifest = Path(state.manifest)
        self.lines = part_path(self.manifest, rank)
        self.present = set(state.present)
        self.next_number = state.base  # sequential names continue from here
        self.written: list[Path] = []
        self.grid_images: list = []  # sequential runs make the grid from memory, as the reference
        self.started = time.perf_counter()
        steps = sum(session.steps_run(plan[b].sampling) for b in self.share)
        self.bar = tqdm(total=steps, desc="sampling", unit="step", dynamic_ncols=True, disable=rank != 0)

    def run_batch(self, b: int) -> list[Path]:
        batch = self.plan[b]
        start = time.perf_counter()
        missing = [pos for pos in batch.kept() if batch.items[pos].index not in self.present]  # a resumed batch
        images = self.session.images(batch, lambda info: self.bar.update(1), positions=missing)
        seconds = round(time.perf_counter() - start, 3)
        paths = []
        for generated in images:
            item = batch.items[generated.position]
            path = self._save(generated.image, item.index, generated.parameters)
            if generated.first_pass is not None:  # beside it, under A1111's suffix
                imageio.save_png(generated.first_pass, path.with_name(f"{path.stem}-before-highres-fix.png"),
                                 {metadata.PARAMETERS_KEY: generated.parameters}, watermark=False, overwrite=False)
            append_jsonl(self.lines, {
                "item": item.index, "file": path.relative_to(self.outdir).as_posix(), "seed": item.seed,
                "prompt": item.prompt, "negative_prompt": item.negative_prompt, "batch": batch.index,
                "position": generated.position, "rank": self.rank, "batch_seconds": seconds,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            paths.append(path)
            if not self.state.indexed:
                # The grid is made of the saved (watermarked) samples and not watermarked again, so a resumed
                # run, whose earlier samples exist only as files, makes the same grid as an uninterrupted one.
                self.grid_images.append(generated.image)
        self.written += paths
        return paths

    def _save(self, image, k: int, text: str) -> Path:
        """Save a sample that already carries the watermark."""
        chunks = {metadata.PARAMETERS_KEY: text}
        if self.state.indexed:
            return imageio.save_png(image, self.samples / sample_name(self.state.base + k), chunks, watermark=False,
                                    overwrite=False)
        path = imageio.save_numbered(image, self.samples, imageio.SAMPLE_DIGITS, metadata=chunks, watermark=False,
                                     start=self.next_number)
        self.next_number = int(path.stem) + 1
        return path

    def run_share(self) -> list[Path]:
        try:
            for b in self.share:
                self.run_batch(b)
        except BaseException as exc:
            self.bar.close()  # the error line then starts on a line of its own, not on the bar's
            if isinstance(exc, KeyboardInterrupt):
                self.note_interrupted()
            raise
        return self.written

    def note_interrupted(self) -> None:
        done = len(self.present) + len(self.written)
        note(f"stopped; {done} of {self.state.total} images are saved"
             f"{' by this process' if self.rank or len(self.share) != len(self.state.todo) else ''} and the image in "
             f"flight was discarded. To finish, run the same command again with --skip-existing "
             f"(run {self.state.run}, {self.manifest.name})")

    def finish(self, processes: int = 1) -> Optional[Path]:
        """Rank 0, after every process is done: merge the manifest, make the grid, report."""
        self.bar.close()
        merge_parts(self.manifest)
        grid = self._grid()
        append_jsonl(self.manifest, {
            "event": "end", "run": self.state.run, "processes": processes, "written_by_rank0": len(self.written),
            "existing": len(self.present), "seconds": round(time.perf_counter() - self.started, 3),
            "grid": grid.name if grid else None, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        print(f"Your samples are ready and waiting for you here: {self.outdir}")
        return grid

    def _grid(self) -> Optional[Path]:
        job = self.job
        if self.state.indexed:
            if self.state.had_grid and not self.state.todo:
                return None  # a finished run re-run with --skip-existing: its grid exists
            # Several processes wrote the images: the grid is made from the files, in plan order.
            images = []
            for batch in self.plan:
                for pos in batch.kept():
                    path = self.samples / sample_name(self.state.base + batch.items[pos].index)
                    if not path.is_file():
                        raise SDError(f"{path} is missing after every process finished: is --outdir on a file "
                                      "system all nodes share?")
                    with Image.open(path) as im:
                        images.append(im.convert("RGB"))
        else:
            images = self.grid_images
        if not images:
            return None
        if len({im.size for im in images}) > 1:
            note("no grid: the images of this run differ in size")
            return None
        grid = imageio.make_grid(images, job.n_rows or self.session.request.batch_size)
        return imageio.save_numbered(grid, self.outdir, imageio.GRID_DIGITS, prefix=imageio.GRID_PREFIX,
                                     watermark=False)  # its tiles carry the watermark


def run_plan(job: "BatchJob", session: "Session", plan: list["Batch"]) -> list[Path]:
    """Run the whole plan in this process; returns the sample paths written."""
    runner = PlanRunner(job, session, plan, begin_run(job, session, plan))
    written = runner.run_share()
    runner.finish()
    return written


def write_side_outputs(job: "BatchJob", session: "Session") -> None:
    """What a run writes besides its samples: depth2img's --save-depth map (OUTDIR/depth-NNNN.png)."""
    from ldm.files import imageio

    task = session.task
    if getattr(task, "save_depth", False) and getattr(task, "depth", None) is not None:
        path = imageio.save_numbered(task.depth, job.outdir, digits=imageio.GRID_DIGITS, prefix="depth-",
                                     watermark=False)
        note(f"depth map written to {path}")
