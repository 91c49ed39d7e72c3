"""The export's documents as read back from a directory (manifest.json, parity.json), declared once.

They are read only through `read_manifest` / `read_parity_json` (runtime.documents: a regular file, bounded
size and depth, one line naming the field). A schema states types and ranges; what a value must equal (the
source's metadata, the files' hashes, the registry's gates) is judged by export.parity."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec

from models.errors import EdgeportError
from runtime.documents import read_document

SHA256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
FileName = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=r"^[^/\\\x00]+$")]
Number = Union[int, float]
Gates = dict[str, dict[str, Number]]
Status = Literal["passed", "failed", "unchecked"]
REEXPORT = "re-export (python -m export ...) rather than editing it"


class Source(msgspec.Struct):
    """What the export was built from (export.source.make_source); ranges are checked by source._check_source."""
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    weights: Annotated[str, msgspec.Meta(max_length=4096)] | None
    weights_sha256: SHA256 | None
    seed: int
    img_size: int
    batch: int
    dynamic_batch: bool
    features_only: bool
    pconv: str | None
    mlp: str | None
    calibrated: bool


class FileEntry(msgspec.Struct):
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: SHA256


class ExportRecord(msgspec.Struct):
    targets: list[str] | None = None  # older manifests: the targets whose files are listed
    held_out: Annotated[str, msgspec.Meta(max_length=4096)] | None = None  # int8 judged on these (--val)


class ParityRecord(msgspec.Struct):
    """The verdict part of parity.json (also the manifest's "parity")."""
    passed: bool | None = None
    breaches: list[str] = []
    gates: Gates = {}
    status: Literal["passed", "failed", "skipped"] | None = None


class Manifest(msgspec.Struct):
    """What the export wrote (export.pipeline); required: what parity and install rely on."""
    source: Source
    metadata: dict[str, Any]
    files: Annotated[dict[FileName, FileEntry], msgspec.Meta(min_length=1)]
    export: ExportRecord = msgspec.field(default_factory=ExportRecord)
    status: Status | None = None
    parity: ParityRecord = msgspec.field(default_factory=ParityRecord)
    form_tag: str | None = None


class ManifestStatus(msgspec.Struct):
    """The one field install reads (whether the export in place passed), also of a partial manifest."""
    status: Status | None = None


class ManifestTargets(msgspec.Struct):
    """What export.parity.manifest_targets reads (which targets were shipped), also of a partial manifest."""
    export: ExportRecord = msgspec.field(default_factory=ExportRecord)
    files: dict[FileName, FileEntry] = {}


class ParityReport(ParityRecord):
    """parity.json as export.parity writes it."""
    results: dict[str, dict[str, Any]] = {}
    gates_override: Gates | None = None


def read_manifest(directory, schema=Manifest) -> dict:
    """DIRECTORY/manifest.json through the Manifest schema (or a part of it), as plain data."""
    path = Path(directory) / "manifest.json"
    return read_document(path, schema, "manifest", f"pass an export directory or {REEXPORT}",
                         error=EdgeportError)


def read_parity_json(directory) -> dict:
    """DIRECTORY/parity.json through the ParityReport schema, as plain data."""
    return read_document(Path(directory) / "parity.json", ParityReport, "parity report",
                         "run python -m export.parity DIR --write", error=EdgeportError)
