"""``manifest.json``: what an output folder was made with, which shards are done, and the summary.

The ``settings`` block (``build_settings``) is what a rerun must match to continue a folder (the
model's config hash and weight files, the processor settings, the output format, the resolved
input), except ``NOT_COMPARED``; versions and run times are recorded but do not have to match.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import shutil
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .._optional import require
from .._version import __version__
from .layout import METADATA_COLUMNS, OutputLayout, write_atomic
from .model import CheckpointInfo
from .options import EmbedOptions
from .sources import InputPlan

__all__ = ["MANIFEST_FORMAT", "NOT_COMPARED", "FILE_TRANSPARENCY", "ADDED_SETTINGS", "RunStats", "Summary", "versions",
           "build_settings", "settings_differences", "open_output", "summarize", "finish_manifest"]

#: the manifest's layout; a folder of another format is not compared, only continued when it has no finished shard
MANIFEST_FORMAT = "packvit-embed/2"


def versions() -> dict[str, str]:
    """packvit, torch, transformers and Python versions of this process."""
    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = "not installed"
    return {"packvit": __version__, "torch": torch.__version__, "transformers": transformers,
            "python": platform.python_version()}


def build_settings(info: CheckpointInfo, processor: dict, plan: InputPlan, given: Sequence[str], options: EmbedOptions,
                   model_dtype: torch.dtype, batch_invariant: bool = False, decode: str = "cpu") -> dict:
    """The ``settings`` block of a run: the model (family, compute dtype, a SHA-256 of every file that
    decides the outputs, ``batch_invariant: true`` when the model runs batch-invariant: absent
    otherwise, as in folders made before the mode existed), the processor as it runs
    (``processor``: its resolved settings) with the decode settings (``decode``: where JPEGs are
    decoded, ``"cpu"`` or ``"gpu"``, whose embeddings differ slightly; what transparent files
    become), the output format and the resolved input. JSON values, as a manifest reads back."""
    settings = {
        "model": {"checkpoint": info.checkpoint, "family": info.family, "dtype": str(model_dtype).replace("torch.", ""),
                  "files_sha256": info.file_hashes(), **({"batch_invariant": True} if batch_invariant else {})},
        "processor": {**processor, "max_pixels": options.max_pixels, "num_frames": options.num_frames,
                      "videos": "clips" if info.takes_video else "frames as items", "decode": decode,
                      "transparency_of_files": FILE_TRANSPARENCY},
        "output": {"dtype": options.dtype, "normalize": options.normalize, "tokens": list(options.token_names),
                   "shard_size": options.shard_size},
        "input": {"given": list(given), "kind": plan.kind, "num_inputs": plan.num_inputs, "num_tasks": len(plan.tasks),
                  "fingerprint": plan.fingerprint},
    }
    return json.loads(json.dumps(settings, default=str))


def _flatten(settings: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: settings recorded for information, not compared (the same model or input may be named differently)
NOT_COMPARED = ("model.checkpoint", "input.given")
#: what a transparent image file becomes: the processor opens each file, as the reference reads a file
#: (``packvit.preprocess.common``); before, the files were opened first and composited as images in memory
FILE_TRANSPARENCY = "as the reference reads a file"
#: settings added to this manifest format later, with the value a folder made before them was made with
ADDED_SETTINGS = {"processor.decode": "cpu",
                  "processor.transparency_of_files": "composited onto white, as an image in memory"}


def settings_differences(old: dict, new: dict) -> list[str]:
    """``"key: old → new"`` for each compared setting that differs (a folder's settings lacking one
    of ``ADDED_SETTINGS`` were made with its value)."""
    old_flat, new_flat = {**ADDED_SETTINGS, **_flatten(old)}, _flatten(new)
    keys = sorted((old_flat.keys() | new_flat.keys()) - set(NOT_COMPARED))
    return [f"{key}: {old_flat.get(key)!r} → {new_flat.get(key)!r}" for key in keys if old_flat.get(key) != new_flat.get(key)]


def _write_json(layout: OutputLayout, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    write_atomic(layout.manifest, lambda handle: handle.write(text.encode()))


def _remove_outputs(layout: OutputLayout) -> None:
    for folder in layout.folders:
        shutil.rmtree(folder, ignore_errors=True)
    layout.manifest.unlink(missing_ok=True)
    layout.failures.unlink(missing_ok=True)


def _has_finished_shard(layout: OutputLayout) -> bool:
    """Whether any shard was committed (its metadata file renamed into place), whatever the run."""
    folder = layout.root / "metadata"
    return folder.is_dir() and any(folder.glob("metadata_*.parquet"))


def _refusal(layout: OutputLayout, manifest: dict | None, settings: dict) -> str | None:
    """Why the folder's finished outputs cannot be continued with ``settings``; ``None`` if they can."""
    if manifest is None:
        if any(folder.is_dir() and any(folder.iterdir()) for folder in layout.folders):
            return (f"{layout.root} holds img_emb/metadata files but no manifest.json, so it is not known how they were "
                    f"made; pass another --output, or --overwrite to replace them")
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        return (f"{layout.root} was made by another packvit release (manifest format {manifest.get('format')!r}, this "
                f"one writes {MANIFEST_FORMAT!r}), whose settings cannot be compared; pass another --output to keep it, "
                f"or --overwrite to replace it")
    differences = settings_differences(manifest.get("settings", {}), settings)
    if differences:
        return (f"{layout.root} holds embeddings made with other settings ({'; '.join(differences)}); pass another "
                f"--output to keep them, or --overwrite to replace them")
    return None


def open_output(layout: OutputLayout, settings: dict, world_size: int, overwrite: bool = False) -> dict:
    """Checks a folder against ``settings`` (or starts it) and records this run; returns the manifest.

    Raises ``ValueError`` when the folder holds finished shards of another run, unless
    ``overwrite``; a folder whose runs finished no shard is started afresh.
    """
    manifest = json.loads(layout.manifest.read_text()) if layout.manifest.is_file() else None
    refusal = None if overwrite else _refusal(layout, manifest, settings)
    if refusal is not None and _has_finished_shard(layout):
        raise ValueError(refusal)
    if overwrite or refusal is not None:
        _remove_outputs(layout)
        manifest = None
    layout.root.mkdir(exist_ok=True)
    if manifest is None:
        manifest = {"format": MANIFEST_FORMAT, "settings": settings, "columns": list(METADATA_COLUMNS),
                    "created": _now(), "runs": [], "shards": {"total": layout.num_tasks, "done": []}, "summary": None}
    manifest["runs"].append({"started": _now(), "world_size": world_size, "versions": versions()})
    _write_json(layout, manifest)
    return manifest


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunStats:
    """Where one process's run went: seconds in all, waiting for the DataLoader workers and waiting
    to hand packs to the writer; inputs, items and patch tokens it encoded; its worker count; where
    it decoded JPEGs (``decode``) and, on the GPU route, the files decoded on the device and those
    the device refused, decoded by the CPU opener."""

    workers: int = 0
    decode: str = "cpu"
    gpu_decoded: int = 0
    gpu_fallbacks: int = 0
    wall_s: float = 0.0
    data_wait_s: float = 0.0
    writer_wait_s: float = 0.0
    inputs: int = 0
    items: int = 0
    tokens: int = 0


@dataclass
class Summary:
    """The outcome of a run over the whole folder: rows by status, shards done and missing."""

    output: str
    rows: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    shards_done: int = 0
    shards_total: int = 0
    missing_shards: list[str] = field(default_factory=list)
    failures_file: str | None = None
    #: the files of an input folder that are not images or videos (not read), by extension
    skipped: dict[str, int] = field(default_factory=dict)
    #: this process's figures (each rank has its own); ``None`` when it encoded nothing
    stats: RunStats | None = None

    @property
    def ok(self) -> int:
        return self.by_status.get("ok", 0)

    @property
    def failed(self) -> int:
        return self.rows - self.ok

    def lines(self) -> list[str]:
        """The summary as printed at the end of a run."""
        failed = ", ".join(f"{status} {count}" for status, count in sorted(self.by_status.items()) if status != "ok")
        lines = [f"{self.rows} items in {self.shards_done}/{self.shards_total} shards under {self.output}: "
                 f"{self.ok} ok, {self.failed} failed" + (f" ({failed})" if failed else "")]
        if self.skipped:
            counts = ", ".join(f"{extension} {count}" for extension, count in self.skipped.items())
            lines.append(f"not read: {sum(self.skipped.values())} files of the input folder that are not images or "
                         f"videos ({counts}); a .txt or .json beside an image is its caption or json column")
        if self.failures_file:
            lines.append(f"failed items are listed in {self.failures_file} (and in metadata/*.parquet, status != 'ok')")
        if self.missing_shards:
            lines.append(f"{len(self.missing_shards)} shards are not done ({', '.join(self.missing_shards[:5])}"
                         f"{', ...' if len(self.missing_shards) > 5 else ''}): rerun the same command to finish them")
        return lines


def summarize(layout: OutputLayout, tasks: Sequence[int], with_tokens: bool, skipped: dict[str, int] | None = None) -> Summary:
    """Counts the rows of every done shard by status and writes ``failures.parquet`` (the failed
    rows of all shards, with a ``shard`` column) when there are any."""
    parquet = require("pyarrow.parquet", "embed", "reading the metadata parquet files")
    import pyarrow as pa
    import pyarrow.compute as pc

    summary = Summary(str(layout.root), shards_total=len(tasks), skipped=dict(skipped or {}))
    failures = []
    for task in tasks:
        if not layout.is_complete(task, with_tokens):
            summary.missing_shards.append(layout.shard_name(task))
            continue
        summary.shards_done += 1
        statuses = parquet.read_table(layout.metadata(task), columns=["status"]).column("status")
        summary.rows += len(statuses)
        for status, count in zip(*pc.value_counts(statuses).flatten()):
            summary.by_status[status.as_py()] = summary.by_status.get(status.as_py(), 0) + count.as_py()
        if pc.any(pc.not_equal(statuses, "ok")).as_py():
            table = parquet.read_table(layout.metadata(task))
            failed = table.filter(pc.not_equal(table.column("status"), "ok"))
            failures.append(failed.append_column("shard", pa.array([layout.shard_name(task)] * failed.num_rows)))
    layout.failures.unlink(missing_ok=True)
    if failures:
        table = pa.concat_tables(failures)
        write_atomic(layout.failures, lambda handle: parquet.write_table(table, handle))
        summary.failures_file = str(layout.failures)
    return summary


def finish_manifest(layout: OutputLayout, summary: Summary) -> None:
    """Records the done shards and the summary in ``manifest.json``."""
    manifest = json.loads(layout.manifest.read_text())
    missing = set(summary.missing_shards)
    manifest["shards"] = {"total": layout.num_tasks,
                          "done": [layout.shard_name(task) for task in range(layout.num_tasks)
                                   if layout.shard_name(task) not in missing]}
    manifest["summary"] = {"rows": summary.rows, "ok": summary.ok, "failed": summary.failed, "by_status": summary.by_status,
                           "failures_file": summary.failures_file, "skipped": summary.skipped}
    _write_json(layout, manifest)
