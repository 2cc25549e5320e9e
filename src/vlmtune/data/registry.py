"""`dataset_info.json`: the LLaMA-Factory registry that names each dataset file and its layout.

An entry looks like::

    "my_dataset": {"file_name": "my_dataset.json", "formatting": "sharegpt",
                   "columns": {"messages": "messages", "images": "images"},
                   "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                            "assistant_tag": "assistant", "system_tag": "system"}}

`formatting` is `sharegpt`, `openai` (read as sharegpt: LLaMA-Factory's openai entries are messages with
role/content tags, a first system message taken as the system) or `alpaca` (the default). Columns and tags
default to the ShareGPT convention (`conversations`, `from`/`value`, `human`/`gpt`/`system`) or, for alpaca,
`instruction`/`input`/`output`.

`file_name` is a `.json` (a list of records) or `.jsonl` file, or a folder: then every `.json`/`.jsonl`
file in it, in name order (LLaMA-Factory reads a folder's files as one dataset; its csv, parquet, arrow and
txt files are refused here in one line). `num_samples` draws that many records as LLaMA-Factory does (a
seeded permutation, topped up with records drawn again when the file holds fewer; see `formats.load_entry`).

A dataset may also be named by its path, ms-swift's way, without a registry entry (`file_entry`): its layout
is read off its first record (`infer_layout`). A registered name always means its entry.

Refused in one line naming the dataset: hub and cloud datasets (`hf_hub_url`, `ms_hub_url`, `om_hub_url`,
`script_url`, `cloud_file_name` without `file_name`) and data for other training stages (`ranking: true`;
`chosen`, `rejected` or `kto_tag` columns) — vlmtune trains supervised fine-tuning only. Keys LLaMA-Factory
does not know are ignored, as LLaMA-Factory ignores them, and listed by `vlmtune data check` with the closest
known key (`DatasetEntry.notes`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
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
FORMATTINGS = ("sharegpt", "openai", "alpaca")
READ_SUFFIXES = (".json", ".jsonl")

# Every key LLaMA-Factory reads from an entry (its data/README.md), and from its `columns` and `tags`.
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# `file_sha1`: older LLaMA-Factory registries carry it on every entry (a checksum it no longer reads).
ENTRY_KEYS = HUB_KEYS + ("file_name", "formatting", "ranking", "subset", "split", "folder", "num_samples",
                         "columns", "tags", "file_sha1")
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos",
               "audios", "chosen", "rejected", "kto_tag")
TAG_KEYS = tuple(SHAREGPT_TAGS)
# Columns of preference (DPO, reward model) and KTO data: another training stage than vlmtune's.
OTHER_STAGE_COLUMNS = ("chosen", "rejected", "kto_tag")


@dataclass
class DatasetEntry:
    """One dataset of the registry, with defaults filled in and the file path resolved."""

    name: str
    path: Path  # file_name: a file, or a folder of them
    formatting: str
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    dataset_dir: Path = Path(".")
    media_dir: Path | None = None  # where relative image paths resolve (default: dataset_dir)
    files: list[Path] = field(default_factory=list)  # what is read: [path], or a folder's files in name order
    num_samples: int | None = None
    notes: list[str] = field(default_factory=list)  # keys LLaMA-Factory does not know, for `vlmtune data check`

    def __post_init__(self) -> None:
        self.files = self.files or [self.path]

    @property
    def is_folder(self) -> bool:
        return self.files != [self.path]


def read_registry(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / REGISTRY_FILE
    if not path.is_file():
        raise VlmtuneError(f"{path}: not found (set dataset_dir to the folder holding {REGISTRY_FILE})")
    registry = read_json(path)
    if not isinstance(registry, dict):
        raise VlmtuneError(f"{path}: expected an object mapping dataset names to entries")
    return registry


def resolve(names: str, dataset_dir: str | Path, media_dir: str | Path | None = None) -> list[DatasetEntry]:
    """Entries for a comma-separated list of dataset names: registered ones, or — as ms-swift takes them — paths
    of .json/.jsonl files or folders (`file_entry`)."""
    dataset_dir = Path(dataset_dir)
    registry_path = dataset_dir / REGISTRY_FILE
    registry: dict | None = None
    entries = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if registry is None and (registry_path.is_file() or not looks_like_path(name)):
            registry = _registry_for(name, names, dataset_dir)
        if registry is not None and name in registry:
            entries.append(_entry(name, registry[name], registry_path, dataset_dir))
        elif looks_like_path(name):
            entries.append(file_entry(name, dataset_dir, registry_path))
        else:
            close = difflib.get_close_matches(name, registry or {}, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise VlmtuneError(f"{registry_path}: unknown dataset '{name}'{hint}")
        entries[-1].media_dir = Path(media_dir) if media_dir else None
    if not entries:
        raise VlmtuneError(f"{registry_path}: no dataset named (dataset is empty)")
    return entries


def _registry_for(name: str, names: str, dataset_dir: Path) -> dict:
    """The registry a dataset name needs; without one, the error names the dataset (a file whose name holds a
    comma is cut in two at it, as LLaMA-Factory cuts `dataset`, and its first piece then reads as a name)."""
    try:
        return read_registry(dataset_dir)
    except VlmtuneError as exc:
        if (dataset_dir / REGISTRY_FILE).is_file():
            raise
        split = "," in names and Path(names.strip()).exists()
        hint = f" (dataset names are split at commas: rename the file '{names.strip()}')" if split else ""
        raise VlmtuneError(f"dataset '{name}': not a .json/.jsonl path, and {exc}{hint}") from None


def looks_like_path(name: str) -> bool:
    """A dataset named by its file (`data/train.jsonl`, `/data/parts/`) rather than by a registry name."""
    return Path(name).suffix.lower() in READ_SUFFIXES or "/" in name or os.sep in name


def file_entry(name: str, dataset_dir: Path, registry_path: Path) -> DatasetEntry:
    """A dataset given as a path, ms-swift's way: the file or folder as given (from the current directory), else
    under dataset_dir. Its layout (`formatting: auto`) is read off its first record (`infer_layout`); relative
    image paths resolve against the file's folder, else the current directory."""
    try:
        given = Path(name).expanduser()
    except RuntimeError:  # `~someone/...` for a user this machine does not have
        raise VlmtuneError(f"dataset '{name}': no home directory for that user") from None
    found = next((p for p in (given, dataset_dir / given) if p.exists()), None)
    if found is None:
        # exists() is False for a link to nothing (or a link loop): say so rather than "no such file"
        link = next((p for p in (given, dataset_dir / given) if p.is_symlink()), None)
        if link is not None:
            raise VlmtuneError(f"dataset '{name}': {link} is a symbolic link to nothing (or a loop of links)")
        looked = "" if given.is_absolute() else f" (nor under dataset_dir {dataset_dir})"
        raise VlmtuneError(f"dataset '{name}': no such file{looked}, and {registry_path} registers no dataset of "
                           f"that name")

    def bad(field_name: str, message: str) -> VlmtuneError:
        return VlmtuneError(f"dataset '{name}': {message}")

    files = _data_files(found, bad)
    return DatasetEntry(name=found.stem if found.is_file() else found.name, path=found, formatting="auto",
                        dataset_dir=found.parent if found.is_file() else found, files=files)


# The layouts a dataset given by path may have (ms-swift's standard ones), by the first record's keys.
OPENAI_TAGS = {**SHAREGPT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "observation_tag": "tool"}
QUERY_RESPONSE_COLUMNS = {**ALPACA_COLUMNS, "prompt": "query", "query": None, "response": "response",
                          "history": "history", "system": "system"}


def infer_layout(entry: DatasetEntry, record: object) -> DatasetEntry | None:
    """The entry with the columns and tags of `record`'s layout: `messages` / `conversations` (role/content or
    from/value turns), `instruction` + `output` (alpaca), `query` + `response` (ms-swift's query-response, with
    `history` pairs); None when it is none of them."""
    if not isinstance(record, dict):
        return None
    for column in ("messages", "conversations"):
        if isinstance(record.get(column), list):
            first = next((turn for turn in record[column] if isinstance(turn, dict)), {})
            tags = OPENAI_TAGS if "role" in first else SHAREGPT_TAGS
            return dataclasses.replace(entry, formatting="sharegpt", tags=dict(tags),
                                       columns={**SHAREGPT_COLUMNS, "messages": column, "system": "system"})
    if {"instruction", "output"} <= record.keys():
        return dataclasses.replace(entry, formatting="alpaca", tags=dict(SHAREGPT_TAGS),
                                   columns={**ALPACA_COLUMNS, "history": "history", "system": "system"})
    if {"query", "response"} <= record.keys():
        return dataclasses.replace(entry, formatting="alpaca", tags=dict(SHAREGPT_TAGS),
                                   columns=dict(QUERY_RESPONSE_COLUMNS))
    return None


def _entry(name: str, raw: dict, registry_path: Path, dataset_dir: Path) -> DatasetEntry:
    def bad(field_name: str, message: str) -> VlmtuneError:
        return VlmtuneError(f"{registry_path}: dataset '{name}': field '{field_name}': {message}")

    if not isinstance(raw, dict):
        raise VlmtuneError(f"{registry_path}: dataset '{name}': entry must be an object, got {type(raw).__name__}")
    if "file_name" not in raw:
        other = next((k for k in HUB_KEYS if k in raw), None)
        if other:
            raise bad(other, "hub and cloud datasets cannot be read here; download the file and use file_name")
        raise bad("file_name", "missing")
    if not isinstance(raw["file_name"], str) or not raw["file_name"].strip():
        raise bad("file_name", f"must be a file name (a string), got {raw['file_name']!r}")
    formatting = raw.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise bad("formatting", f"must be one of {', '.join(FORMATTINGS)}, got {formatting!r}")
    columns = dict(ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS)
    columns.update(_names(raw, "columns", bad, allow_null=True))
    _refuse_other_stages(raw, columns, bad)
    tags = dict(SHAREGPT_TAGS)
    tags.update(_names(raw, "tags", bad, allow_null=False))
    path = Path(raw["file_name"])
    if not path.is_absolute():
        path = dataset_dir / path
    return DatasetEntry(name=name, path=path, formatting=formatting, columns=columns, tags=tags,
                        dataset_dir=dataset_dir, files=_data_files(path, bad),
                        num_samples=_num_samples(raw, bad), notes=unknown_keys(raw, f"{registry_path}: dataset "
                                                                                       f"'{name}'"))


def _refuse_other_stages(raw: dict, columns: dict[str, str | None], bad) -> None:
    """Preference and KTO data train a reward model or a DPO/KTO stage; read as supervised data, the rejected
    answers would be dropped silently and the chosen ones never reached."""
    if raw.get("ranking"):
        raise bad("ranking", "preference data (ranking: true) is for reward-model / DPO training; vlmtune trains "
                             "supervised fine-tuning (sft) only")
    for column in OTHER_STAGE_COLUMNS:
        if columns.get(column) is not None:
            raise bad(f"columns.{column}", f"a {column} column is for preference or KTO training; vlmtune trains "
                                           f"supervised fine-tuning (sft) only")


def _data_files(path: Path, bad) -> list[Path]:
    """The files read for `file_name`: the file itself, or a folder's .json/.jsonl files in name order (sorted, so
    every run and every rank sees the records in one order). A missing file is left to the reader, which names it."""
    types = "vlmtune reads .json and .jsonl files (convert csv, parquet, arrow or txt data to JSON)"
    if not path.is_dir():
        if path.suffix.lower() not in READ_SUFFIXES:
            raise bad("file_name", f"{path}: {types}")
        return [path]
    try:  # hidden files (.DS_Store, editors' swap files) and sub-folders are no one's data
        files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
    except OSError as exc:
        raise bad("file_name", f"{path}: cannot list the folder ({exc.strerror or exc})") from None
    others = [p.name for p in files if p.suffix.lower() not in READ_SUFFIXES]
    if others:
        raise bad("file_name", f"{path}: the folder holds {', '.join(others[:3])}"
                               f"{' …' if len(others) > 3 else ''}; {types}, one type per folder")
    if not files:
        raise bad("file_name", f"{path}: the folder holds no .json or .jsonl file")
    return files


def _num_samples(raw: dict, bad) -> int | None:
    value = raw.get("num_samples")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad("num_samples", f"must be a positive whole number of records, got {value!r}")
    return value


def unknown_keys(raw: dict, where: str) -> list[str]:
    """One line per key of the entry, its `columns` or its `tags` that LLaMA-Factory does not read, with the
    closest key it does: a typo (`column`, `columns.image`) is ignored by both tools, so it is said here."""
    notes = []
    for prefix, keys, known in (("", raw, ENTRY_KEYS), ("columns.", raw.get("columns"), COLUMN_KEYS),
                                ("tags.", raw.get("tags"), TAG_KEYS)):
        for key in keys if isinstance(keys, dict) else ():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (closest known key: '{prefix}{close[0]}')" if close else ""
                notes.append(f"{where}: key '{prefix}{key}' is not a LLaMA-Factory key and is ignored{hint}")
    return notes


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
