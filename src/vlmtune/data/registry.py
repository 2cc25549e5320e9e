"""`dataset_info.json`: the LLaMA-Factory registry that names each dataset file and its layout.

An entry looks like::

    "my_dataset": {"file_name": "my_dataset.json", "formatting": "sharegpt",
                   "columns": {"messages": "messages", "images": "images"},
                   "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                            "assistant_tag": "assistant", "system_tag": "system"}}

Columns and tags default to the ShareGPT convention (`conversations`, `from`/`value`,
`human`/`gpt`/`system`) or, for alpaca, `instruction`/`input`/`output`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.files import read_json

REGISTRY_FILE = "dataset_info.json"

SHAREGPT_COLUMNS = {"messages": "conversations", "images": "images", "system": None}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                  "system": None, "images": "images"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


@dataclass
class DatasetEntry:
    """One dataset of the registry, with defaults filled in and the file path resolved."""

    name: str
    path: Path
    formatting: str
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    dataset_dir: Path = Path(".")
    media_dir: Path | None = None  # where relative image paths resolve (default: dataset_dir)


def read_registry(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / REGISTRY_FILE
    if not path.is_file():
        raise VlmtuneError(f"{path}: not found (set dataset_dir to the folder holding {REGISTRY_FILE})")
    registry = read_json(path)
    if not isinstance(registry, dict):
        raise VlmtuneError(f"{path}: expected an object mapping dataset names to entries")
    return registry


def resolve(names: str, dataset_dir: str | Path, media_dir: str | Path | None = None) -> list[DatasetEntry]:
    """Entries for a comma-separated list of dataset names."""
    dataset_dir = Path(dataset_dir)
    registry = read_registry(dataset_dir)
    registry_path = dataset_dir / REGISTRY_FILE
    entries = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in registry:
            close = difflib.get_close_matches(name, registry, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise VlmtuneError(f"{registry_path}: unknown dataset '{name}'{hint}")
        entries.append(_entry(name, registry[name], registry_path, dataset_dir))
        entries[-1].media_dir = Path(media_dir) if media_dir else None
    if not entries:
        raise VlmtuneError(f"{registry_path}: no dataset named (dataset is empty)")
    return entries


def _entry(name: str, raw: dict, registry_path: Path, dataset_dir: Path) -> DatasetEntry:
    def bad(field_name: str, message: str) -> VlmtuneError:
        return VlmtuneError(f"{registry_path}: dataset '{name}': field '{field_name}': {message}")

    if not isinstance(raw, dict):
        raise VlmtuneError(f"{registry_path}: dataset '{name}': entry must be an object, got {type(raw).__name__}")
    if "file_name" not in raw:
        other = next((k for k in ("hf_hub_url", "ms_hub_url", "script_url", "om_hub_url") if k in raw), None)
        if other:
            raise bad(other, "hub datasets cannot be read here; download the file and use file_name")
        raise bad("file_name", "missing")
    if not isinstance(raw["file_name"], str) or not raw["file_name"].strip():
        raise bad("file_name", f"must be a file name (a string), got {raw['file_name']!r}")
    formatting = raw.get("formatting", "alpaca")
    if formatting not in ("sharegpt", "alpaca"):
        raise bad("formatting", f"must be sharegpt or alpaca, got {formatting!r}")
    columns = dict(SHAREGPT_COLUMNS if formatting == "sharegpt" else ALPACA_COLUMNS)
    columns.update(_names(raw, "columns", bad, allow_null=True))
    tags = dict(SHAREGPT_TAGS)
    tags.update(_names(raw, "tags", bad, allow_null=False))
    path = Path(raw["file_name"])
    if not path.is_absolute():
        path = dataset_dir / path
    return DatasetEntry(name=name, path=path, formatting=formatting, columns=columns, tags=tags,
                        dataset_dir=dataset_dir)


def _names(raw: dict, key: str, bad, allow_null: bool) -> dict[str, str | None]:
    """`columns` / `tags`: an object of names (strings; a column may be null: not used)."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(key, f"must be an object of names, got {type(value).__name__}")
    for item, name in value.items():
        if not (isinstance(name, str) or (allow_null and name is None)):
            raise bad(f"{key}.{item}", f"must be a {'column' if key == 'columns' else 'tag'} name (a string), "
                                       f"got {name!r}")
    return value
