"""Descriptions in and out: the JSON format CuPL and DCLIP publish, ``{class name: [sentences]}``.

An imported file becomes rows of ``generations`` (template ``import/SOURCE``, model
``import:SOURCE``), cleaned like any answer, so a run can train on it (``--sources SOURCE``) with no
LLM. Files that nest the mapping under a dataset key (``{"imagenet1k": {...}}``, as clip_benchmark
ships CuPL's) are read too. Class names are matched to the dataset spec exactly, then ignoring
case, underscores and surrounding space; names that match no class are reported, never dropped
silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from textadapt import TextadaptError
from textadapt.cleaning import clean
from textadapt.datasets import DatasetSpec
from textadapt.store import Generation, Store


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


@dataclass
class ImportResult:
    source: str
    rows: int = 0
    rejected: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # names in the file that match no class
    missing: list[str] = field(default_factory=list)  # classes of the dataset with nothing in the file


def _mapping(data, path: Path, spec: DatasetSpec, key: str | None) -> dict[str, list[str]]:
    if not isinstance(data, dict):
        raise TextadaptError(f"{path}: expected a JSON object {{class name: [sentences]}}, found {type(data).__name__}")
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        pick = key or (spec.name if spec.name in data else nested[0] if len(nested) == 1 else None)
        if pick not in data:
            raise TextadaptError(f"{path} holds several datasets {nested}; choose one with --key")
        data = data[pick]
    bad = [k for k, v in data.items() if not (isinstance(v, list) and all(isinstance(x, str) for x in v))]
    if bad:
        raise TextadaptError(f"{path}: the value of {bad[:3]} is not a list of strings")
    return data


def import_descriptions(path: Path, spec: DatasetSpec, source: str, store: Store, key: str | None = None) -> ImportResult:
    raw = Path(path).read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TextadaptError(f"{path}: not a JSON file: {e}") from None
    if not source or "/" in source:
        raise TextadaptError(f"source name {source!r}: give a short name without '/', e.g. cupl")
    mapping = _mapping(data, path, spec, key)
    exact = {c: c for c in spec.classes}
    loose = {_norm(c): c for c in spec.classes}
    file_hash = hashlib.sha256(raw).hexdigest()
    result, rows = ImportResult(source), []
    for name, sentences in mapping.items():
        cls = exact.get(name) or loose.get(_norm(name))
        if cls is None:
            result.unmatched.append(name)
            continue
        for i, sentence in enumerate(sentences):
            description, rejected = clean(sentence)
            k = hashlib.sha256(json.dumps([spec.name, source, file_hash, cls, i], ensure_ascii=False).encode()).hexdigest()
            rows.append(
                Generation(
                    key=k,
                    dataset=spec.name,
                    class_name=cls,
                    template=f"import/{source}",
                    template_hash=file_hash,
                    model=f"import:{source}",
                    prompt="",
                    params={"file": str(path)},
                    sample_index=i,
                    raw_text=sentence,
                    description=description,
                    rejected=rejected,
                )
            )
            result.rejected += rejected is not None
            result.per_class[cls] = result.per_class.get(cls, 0) + (rejected is None)
    result.missing = [c for c in spec.classes if not result.per_class.get(c)]
    store.add_generations(rows)
    result.rows = len(rows)
    return result


def export_descriptions(
    store: Store, dataset: str | None = None, template: str | None = None, run_id: str | None = None
) -> dict[str, list[str]]:
    """{class name: [descriptions]}: the current descriptions (view ``current_descriptions``: each template's current
    version), or with ``run_id`` the descriptions that run trained on (view ``run_descriptions``)."""
    where, args = ["TRUE"], []
    if run_id:
        where.append("d.run_id = ? AND d.used")
        args.append(run_id)
    if dataset:
        where.append("d.dataset = ?")
        args.append(dataset)
    if template:
        where.append("(d.template = ? OR d.template LIKE ?)")
        args += [template, f"{template}/%"]
    view = "run_descriptions" if run_id else "current_descriptions"
    rows = store.query(
        f"SELECT d.class_name, d.description FROM {view} d WHERE {' AND '.join(where)} "
        "ORDER BY d.class_name, d.template, d.key, d.item",
        args,
    )
    out: dict[str, list[str]] = {}
    for cls, text in rows:
        if text not in out.setdefault(cls, []):
            out[cls].append(text)
    return out
