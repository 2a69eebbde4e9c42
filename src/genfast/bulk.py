"""Bulk generation into a folder: resumable shards and a manifest, over any number of processes.

`genfast sample NAME -n 1000000 --out DIR` runs in one process; `--nproc N`, or
`torchrun --nproc_per_node N [--nnodes M ...] -m genfast sample ...` (DIR then on storage
every node sees), spreads the work over processes. The n images are cut into shards of
`shard_size` consecutive indexes; the unfinished shards are dealt out to the processes
(shard k to the process k mod N of the list), and each shard is written whole before its
record is:

    DIR/000000.png ...              png: one file per image, named by its index
    DIR/shard_000000.npz ...        npz: a shard's images (uint8, (k, C, H, W)), labels, index
    DIR/manifest.d/shard_*.json     a finished shard: its first index, count, distinct images, sha256
    DIR/manifest.json               the job; once complete, also every shard's record
                                    (until then "complete" is absent)

Image i is drawn from the noise of index i (`Sampler.noise`) in a shard of the same
images whatever N is, so the folder's images do not depend on N (byte-for-byte, on the
same hardware and thread count: the .npz files carry no time stamps). A killed job run
again with the same options, at any N, checks the finished shards' checksums, keeps
them, and makes only the rest: no gap, no duplicate. Another job's folder is refused.

`--engine auto` (the default) is decided once, by process 0, for the images still to
make, and written into the manifest (`engine_stack`), where the other processes
read it: they neither decide again nor disagree. A resumed job keeps the stack its first
shards were made with, whatever the cache says now, so that all its shards match.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genfast import checkpoint, distributed, engines, images, pretrained
from genfast.devices import resolve_device
from genfast.engines import auto
from genfast.errors import GenfastError
from genfast.families.base import Sampler
from genfast.fileio import atomic_path, ensure_dir, write_bytes, writing

FORMATS = ("png", "npz")
MAX_SHARD_BYTES = 1 << 30  # the pixels of one shard, in memory until it is written
MANIFEST = "manifest.json"
RECORDS = "manifest.d"


def job(model: str, n: int, seed: int = 0, class_index: int | None = None, prompt: str | None = None,
        settings: dict | None = None, engine: str = "eager", fmt: str = "png", shard_size: int = 1000) -> dict:
    """What decides the folder's images: a re-run must ask for exactly this to resume it."""
    if fmt not in FORMATS:
        raise GenfastError(f"unknown format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if shard_size < 1:
        raise GenfastError(f"--shard-size must be at least 1, got {shard_size}")
    path = checkpoint.resolve(model)
    return {"model": str(model), "model_sha256": _sha256([path]), "n": n, "seed": seed, "class": class_index,
            "prompt": prompt, "settings": {k: v for k, v in (settings or {}).items() if v is not None},
            "engine": engine, "format": fmt, "shard_size": shard_size}


def generate(spec: dict, out: Path, batch_size: int = 256, device: str = "cpu", progress: bool = True,
             condition: torch.Tensor | None = None, say: Callable[[str], None] | None = None) -> tuple[int, int]:
    """Make the images of `spec` (see `job`) that `out` lacks, this process's share of
    them; returns (images this process wrote, images already there when it started).
    `condition`: one prompt embedding for every image (ar-text); `say`: where process 0
    tells which stack `auto` runs (one line)."""
    here = distributed.world()
    where = distributed.device_of(resolve_device(device), here)
    with distributed.joined(where):
        return _generate(spec, Path(out), batch_size, where, progress, condition, here, say or (lambda line: None))


def _generate(spec: dict, out: Path, batch_size: int, device: torch.device, progress: bool,
              condition: torch.Tensor | None, here: distributed.World, say: Callable[[str], None]) -> tuple[int, int]:
    # The model first: a wrong setting, an engine that cannot run here, or shards too large to
    # hold, is refused before the folder is touched (auto's stack is chosen with the folder in view).
    plain = pretrained.load(spec["model"], device=device, **spec["settings"])
    sampler = None if spec["engine"] == "auto" else engines.apply(plain, spec["engine"])
    shard_bytes = min(spec["shard_size"], spec["n"]) * math.prod(plain.image_shape)  # held whole until written
    if shard_bytes > MAX_SHARD_BYTES:
        raise GenfastError(f"--shard-size {spec['shard_size']:,} makes shards of {shard_bytes / 2**20:,.0f} MiB, "
                           f"held in memory while they are made; choose at most "
                           f"{MAX_SHARD_BYTES // math.prod(plain.image_shape):,}")
    _check_folder(out, spec)  # every process reads and refuses alike: none is left waiting
    _keep_intact(out, spec, here)
    distributed.barrier()
    if here.main:  # the bare job, with the stack it runs, until the run completes
        stack, decided = _engine_stack(out, spec, plain, batch_size, say)
        sampler = sampler or decided
        write_bytes(out / MANIFEST, _json(spec | {"engine_stack": stack}))
    distributed.barrier()
    stack = _readable((out / MANIFEST).read_text)["engine_stack"]
    sampler = sampler or engines.apply(plain, stack)
    finished = _recorded(out, spec)
    distributed.barrier()  # every process has its list before any writes
    # This process's shards, rank, rank + N, ...: a range, walked lazily, so that neither
    # the list of shards nor anything else held grows with n (a job of 10^12 images has 10^9).
    mine = range(here.rank, _shard_count(spec), here.size)
    already = sum(record["count"] for record in finished.values())
    share = _images_in(spec, mine) - sum(record["count"] for k, record in finished.items() if k in mine)

    written = 0
    if share:
        where = f" (process 0's share; {here.size} processes)" if here.size > 1 else ""
        with tqdm(total=share, desc=f"sampling{where}", unit="img", disable=not (progress and here.main)) as bar:
            for k in mine:
                if k not in finished:
                    written += _write_shard(out, spec, k, sampler, condition, batch_size, bar)
    distributed.barrier()  # every shard is written (a process that failed has ended the job)
    if here.main:
        records = _recorded(out, spec)
        write_bytes(out / MANIFEST, _json(spec | {"engine_stack": stack, "complete": True,
                                                  "images": sum(r["count"] for r in records.values()),
                                                  "shards": [records[k] for k in sorted(records)]}))
        shutil.rmtree(out / RECORDS, ignore_errors=True)  # the manifest now holds every record
    return written, already


def _engine_stack(out: Path, spec: dict, plain: Sampler, batch_size: int,
                  say: Callable[[str], None]) -> tuple[str, Sampler | None]:
    """The stack the job runs: the one asked for; for auto, the one the folder's first shards
    were made with, else auto's choice for the images still to make (then also that stack,
    built while deciding: no second build). Decided for all of them, not a process's share,
    so that the number of processes does not change the choice."""
    if spec["engine"] != "auto":
        return spec["engine"], None
    saved = _readable((out / MANIFEST).read_text)  # this job's, if any (_check_folder)
    if isinstance(saved, dict) and "engine_stack" in saved:
        stack = saved["engine_stack"]
        if not isinstance(stack, str) or any(name not in engines.ENGINES for name in stack.split("+")):
            raise GenfastError(f"{out / MANIFEST} names the engine stack {str(stack)[:60]!r}, which is not one; "
                               f"delete the manifest to make the folder's images again, or choose another folder")
        say(f"auto: {stack} (the stack {out}'s first images were made with; a resumed job keeps it)")
        return stack, None
    left = spec["n"] - sum(record["count"] for record in _recorded(out, spec).values())
    fast, choice = auto.resolve(plain, min(batch_size, spec["shard_size"], spec["n"]), engines.apply,
                                n=left, settings=spec["settings"])
    say(choice.line())
    return choice.engine, fast


def _shard_count(spec: dict) -> int:
    return -(-spec["n"] // spec["shard_size"])


def _images_in(spec: dict, shards: range) -> int:
    """Images in these shards: whole shards, less what the last shard of the job lacks."""
    count = _shard_count(spec)
    shortfall = count * spec["shard_size"] - spec["n"]
    return len(shards) * spec["shard_size"] - (shortfall if count - 1 in shards else 0)


def _span(spec: dict, shard: int) -> tuple[int, int]:
    start = shard * spec["shard_size"]
    return start, min(start + spec["shard_size"], spec["n"])


def _files(out: Path, spec: dict, shard: int) -> list[Path]:
    if spec["format"] == "npz":
        return [out / f"shard_{shard:06d}.npz"]
    start, end = _span(spec, shard)
    return [out / f"{i:0{_digits(spec)}d}.png" for i in range(start, end)]


def _digits(spec: dict) -> int:
    """PNG names of one width, so that they sort in index order."""
    return max(6, len(str(spec["n"] - 1)))


def _write_shard(out: Path, spec: dict, shard: int, sampler, condition: torch.Tensor | None, batch_size: int,
                 bar: tqdm) -> int:
    start, end = _span(spec, shard)
    labels = sampler.labels(end - start, spec["class"], start) if condition is None else \
        condition[:1].expand(end - start, -1)
    batches = []
    for first in range(start, end, batch_size):
        last = min(first + batch_size, end)
        noise = sampler.noise(last - first, spec["seed"], first)
        pixels = sampler(noise, None if labels is None else labels[first - start:last - start])
        batches.append(images.to_uint8(pixels.cpu()))
        bar.update(last - first)
    pixels = torch.cat(batches)
    files = _files(out, spec, shard)
    if spec["format"] == "png":
        images.save_each(pixels, files)
    else:
        class_labels = labels is not None and not labels.is_floating_point()
        _write_npz(files[0], images=pixels.numpy(), index=np.arange(start, end),
                   labels=labels.numpy() if class_labels else np.array([], dtype=np.int64))
    # "distinct": how many different images the shard holds (a repeating noise stream, or a
    # collapsed model, shows here first).
    record = {"shard": shard, "start": start, "count": end - start, "distinct": len(set(images.digests(pixels))),
              "sha256": _sha256(files)}
    write_bytes(out / RECORDS / f"shard_{shard:06d}.json", _json(record))  # last: the shard is now finished
    return end - start


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez, atomically and byte-for-byte reproducible (the zip entries carry the fixed
    date of a new ZipInfo, not the time of writing), so equal shards have equal checksums."""
    with writing(path), atomic_path(path, durable=False) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy"), "w") as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def _check_folder(out: Path, spec: dict) -> None:
    """A folder of another job's images (or of images without a manifest) is refused."""
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            saved = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            saved = f"unreadable ({str(e)[:80]})"
        if not isinstance(saved, dict):  # no job to compare with: whose images these are is unknown
            what = saved if isinstance(saved, str) else f"a JSON {type(saved).__name__}, not the job's record"
            raise GenfastError(f"{manifest} is damaged ({what}); delete it to make the folder's images again, "
                               f"or choose another folder")
        # The checkpoint's checksum, not its name or path, says which model it is.
        differ = [f"{key} {saved.get(key)!r} (asked: {spec[key]!r})" for key in spec
                  if key != "model" and saved.get(key) != spec[key]]
        if differ:
            raise GenfastError(f"{out} holds another job's images ({'; '.join(differ)}); run that job again to "
                               f"complete it, or choose another folder")
    elif out.is_dir() and (any(out.glob("[0-9]" * 6 + "*.png")) or any(out.glob("shard_*.npz"))):
        raise GenfastError(f"{out} already holds generated images; choose an empty or new folder")


RECORD_FIELDS = {"shard": int, "start": int, "count": int, "distinct": int, "sha256": str}


def _readable(text_of) -> dict | list | None:
    try:
        return json.loads(text_of())
    except (OSError, ValueError):
        return None


def _valid(record, spec: dict) -> bool:
    """A record of a shard of this job, every field of its type and in place. A damaged one
    is not believed: its shard is made again (a record is only the cache of a checksum)."""
    if not isinstance(record, dict) or any(type(record.get(k)) is not t for k, t in RECORD_FIELDS.items()):
        return False
    shard = record["shard"]
    if not 0 <= shard < _shard_count(spec):
        return False
    start, end = _span(spec, shard)
    return (record["start"], record["count"]) == (start, end - start) and 0 < record["distinct"] <= end - start


def _recorded(out: Path, spec: dict) -> dict[int, dict]:
    """The finished shards' valid records, by shard: the complete manifest's and the record files."""
    manifest = _readable((out / MANIFEST).read_text)
    listed = manifest.get("shards", []) if isinstance(manifest, dict) else []
    found = [*(listed if isinstance(listed, list) else []),
             *(_readable(path.read_text) for path in sorted((out / RECORDS).glob("shard_*.json")))]
    return {record["shard"]: record for record in found if _valid(record, spec)}


def _keep_intact(out: Path, spec: dict, here: distributed.World) -> None:
    """Before a run, each process checks its share of the finished shards: a shard whose
    files are all there with their checksum keeps a record file; the others lose theirs
    (and are made again)."""
    if here.main:
        ensure_dir(out / RECORDS)
    distributed.barrier()
    records = _recorded(out, spec)
    if here.rank == 0:  # record files that say nothing believable go (their shards are made again)
        for path in (out / RECORDS).glob("shard_*.json"):
            record = _readable(path.read_text)
            if not (_valid(record, spec) and path.name == f"shard_{record['shard']:06d}.json"):
                path.unlink(missing_ok=True)
    for shard, record in records.items():
        if shard % here.size != here.rank:
            continue
        path = out / RECORDS / f"shard_{shard:06d}.json"
        files = _files(out, spec, shard)
        if all(f.exists() for f in files) and _sha256(files) == record["sha256"]:
            if not path.exists():
                write_bytes(path, _json(record))
        else:
            path.unlink(missing_ok=True)
