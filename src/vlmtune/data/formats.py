"""Read dataset files (json / jsonl) and convert sharegpt, openai or alpaca records into Conversations.

Conversion never stops at the first bad record: each problem is recorded with file, record index and
field, so `vlmtune data check` can list them all and training can skip them when asked. A folder's files
are read in name order and each record keeps its own file and index.

Sampling follows LLaMA-Factory's loader: `num_samples` takes a permutation of the records (seeded by the
run's `seed`, so every run draws the same ones) cut to num_samples, and when the dataset holds fewer, adds
records drawn again at random; `max_samples` then keeps the first ones. A record drawn twice is converted and
reported once and appears twice, as the same Conversation (same file and index).

Images are paths (a string or a list), or objects as Hugging Face `datasets` writes them to JSON
(`{"path": ..., "bytes": null}`); a relative path resolves against media_dir (else dataset_dir) and, as in
LLaMA-Factory, when no file is there but one is at the path as given (from the current directory), that one.
Embedded image bytes are a problem of the record: vlmtune reads image files.
"""

from __future__ import annotations

import os
import random
import re

from pathlib import Path
from typing import Any

from vlmtune.data.conversation import IMAGE_PLACEHOLDER, Conversation, LoadedData, Message, Problem
from vlmtune.data.registry import REGISTRY_FILE, DatasetEntry, infer_layout
from vlmtune.errors import VlmtuneError
from vlmtune.files import decode_text, file_url_path, parse_json
from vlmtune.labels import normalize_answer


# A jsonl line that did not parse (already reported): not the same as a `null` record, which is reported.
UNPARSED = object()


def read_records(path: Path) -> tuple[list[Any], list[Problem]]:
    """All records of a .json (a list) or .jsonl file; unreadable lines become problems.

    The file must be UTF-8 (a BOM is dropped); a file that cannot be read at all is one fatal problem.
    """
    try:
        text = _file_text(path)
    except VlmtuneError as exc:
        return [], [Problem(str(path), None, None, str(exc).removeprefix(f"{path}: "), fatal=True)]
    if path.suffix.lower() == ".jsonl":
        records, problems = [], []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_json(line, f"line {line_no}"))
            except VlmtuneError as exc:  # "line 3: not valid JSON at line 1 column 9 (...)": the line's own column
                problems.append(Problem(str(path), len(records), None, str(exc).replace(" at line 1 column", " at column")))
                records.append(UNPARSED)
        return records, problems
    try:
        data = parse_json(text, path)
    except VlmtuneError as exc:
        return [], [Problem(str(path), None, None, str(exc).removeprefix(f"{path}: "), fatal=True)]
    if not isinstance(data, list):
        return [], [Problem(str(path), None, None, f"expected a JSON list of records, got {type(data).__name__}",
                            fatal=True)]
    return data, []


# JSON text holds no NUL byte: one in the first block is a binary, sparse or UTF-16 file, refused before the rest
# of it (gigabytes, perhaps) is read.
HEAD_BYTES = 1 << 16


def _file_text(path: Path) -> str:
    """The UTF-8 text of a dataset file, or a one-line VlmtuneError. Only a regular file is opened: a pipe named
    x.jsonl would block until something writes to it."""
    if not path.is_file():
        raise VlmtuneError(f"{path}: " + ("not a regular file (a pipe, a socket or a device)" if path.exists()
                                          else "dataset file not found"))
    try:
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
            if b"\0" in head:
                raise VlmtuneError(f"{path}: not JSON text (a NUL byte at offset {head.index(0)}: a binary, sparse "
                                   f"or UTF-16 file?); save the file as UTF-8 JSON")
            raw = head + fh.read()
    except OSError as exc:
        raise VlmtuneError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_text(raw, path)


def load_entry(entry: DatasetEntry, max_samples: int | None = None, seed: int = 42) -> LoadedData:
    """Convert the records of one registry entry: num_samples of them drawn as LLaMA-Factory does (with the
    run's seed), then the first max_samples."""
    records, problems = _entry_records(entry)
    if entry.formatting == "auto" and records:
        first = next(((source, index, record) for source, index, record in records if isinstance(record, dict)), None)
        layout = infer_layout(entry, first[2] if first else None)
        if layout is None:
            return LoadedData(problems=problems + [Problem(
                str((first or records[0])[0]), None, None, f"cannot tell the layout of the records "
                f"({_first_record_words(first, problems)}): expected messages, conversations, instruction + output or "
                f"query + response; or register the file in dataset_info.json with its columns", fatal=True)])
        entry = layout
    if entry.num_samples is not None and min(entry.num_samples, max_samples or entry.num_samples) > max(
            len(records), MAX_DRAWN):
        return LoadedData(problems=problems + [Problem(
            str(entry.dataset_dir / REGISTRY_FILE), None, f"{entry.name}.num_samples", f"{entry.num_samples:,} "
            f"records drawn from {len(records):,}: at most {MAX_DRAWN:,} copies are held (set max_samples to use "
            f"fewer)", fatal=True)])
    picks = list(range(len(records)))
    if entry.num_samples is not None:
        picks = sample_indices(len(records), entry.num_samples, seed, max_samples)
    if max_samples is not None:
        picks = picks[:max_samples]
    out = LoadedData(problems=problems)
    converted: dict[int, Conversation | None] = {}
    for pick in picks:
        if pick not in converted:  # a record drawn again is the same record: converted and reported once
            source, index, record = records[pick]
            converted[pick] = _convert(record, entry, source, index, out.problems)
        if converted[pick] is not None:
            out.conversations.append(converted[pick])
    return out


# The most records a num_samples draw may hold beyond the file's own (each a list slot and a reference): a typo of
# num_samples: 1000000000000 is refused in one line instead of filling the memory.
MAX_DRAWN = 10_000_000


def sample_indices(n: int, num_samples: int, seed: int, limit: int | None = None) -> list[int]:
    """LLaMA-Factory's `num_samples` draw: a permutation of the n records cut to num_samples (every record
    used when there are enough), then records drawn with replacement for the rest — only the first `limit`
    (max_samples) drawn, the same ones as the first `limit` of the whole draw."""
    if n == 0:
        return []
    rng = random.Random(seed)
    picks = rng.sample(range(n), min(n, num_samples))
    wanted = num_samples if limit is None else min(num_samples, limit)
    return picks + [rng.randrange(n) for _ in range(wanted - len(picks))]


def _first_record_words(first: tuple[Path, int, dict] | None, problems: list[Problem]) -> str:
    """What the first JSON object of a dataset holds (its keys, on one line), for the layout error."""
    if first is None:
        return "no record is a JSON object" + (f"; {problems[0].message}" if problems else "")
    _, index, record = first
    keys = ", ".join(k if k.isprintable() else repr(k) for k in sorted(record)[:8]) or "an empty object"
    return f"first record: {keys}" if index == 0 else f"first object, record {index}: {keys}"


def _entry_records(entry: DatasetEntry) -> tuple[list[tuple[Path, int, Any]], list[Problem]]:
    """(file, index in that file, record) for every record of the entry's files, in order, and the problems of
    reading them; none at all is one fatal problem."""
    records: list[tuple[Path, int, Any]] = []
    problems: list[Problem] = []
    for path in entry.files:
        file_records, file_problems = read_records(path)
        records += [(path, index, record) for index, record in enumerate(file_records)]
        problems += file_problems
    if not records and not problems:
        what = "no file of the folder holds a record" if entry.is_folder else "the file holds no record"
        problems = [Problem(str(entry.path), None, None, f"no records ({what})", fatal=True)]
    return records, problems


def _convert(record: Any, entry: DatasetEntry, source: Path, index: int,
             problems: list[Problem]) -> Conversation | None:
    """One record as a Conversation, or None with its problems added to `problems`."""
    if record is UNPARSED:
        return None
    where = (str(source), index)
    if not isinstance(record, dict):
        got = "null" if record is None else type(record).__name__
        problems.append(Problem(*where, None, f"record must be a JSON object, got {got}"))
        return None
    alpaca = entry.formatting == "alpaca"
    in_parts: list[tuple[Any, str]] = []  # images given inside content parts (with their fields), in order
    messages, record_problems = _alpaca(record, entry, where) if alpaca else _sharegpt(record, entry, where,
                                                                                       in_parts)
    images, image_problems = _images(record, entry, where)
    if in_parts and (images or image_problems):
        image_problems = [Problem(*where, entry.columns.get("images") or "images", "images are given both here and "
                                                                                  "in the messages' content parts; "
                                                                                  "keep one")]
    elif in_parts:
        images, image_problems = _image_paths(in_parts, entry, where)
    record_problems += image_problems + _media_problems(record, entry, where, messages)
    conv = None
    if messages is not None and not record_problems:
        normalize_final_answer(messages)
        messages_field = (entry.columns.get("prompt") or "instruction") if alpaca \
            else entry.columns.get("messages") or "conversations"
        # A folder's files each count from record 0: the file's name keeps the ids apart.
        # Images given as content parts are named by their parts: the record may have no images column at all.
        conv = Conversation(messages=messages, images=images, source=str(source), index=index,
                            dataset=entry.name, id=f"{entry.name}-{source.name}-{index}" if entry.is_folder else "",
                            messages_field=messages_field,
                            images_field=messages_field if in_parts else entry.columns.get("images") or "images",
                            image_fields=[field_name for _, field_name in in_parts])
        record_problems += structure_problems(conv)
    problems += record_problems
    return None if record_problems else conv


def normalize_final_answer(messages: list[Message]) -> None:
    """The final assistant answer as labels are compared (`labels.normalize_answer`: NFC, stripped), so that an
    answer typed in NFD trains and scores as the same label as its NFC twin."""
    if messages and messages[-1].role == "assistant":
        messages[-1].content = normalize_answer(messages[-1].content)


def _images(record: dict, entry: DatasetEntry, where: tuple[str, int]) -> tuple[list[str], list[Problem]]:
    column = entry.columns.get("images")
    value = record.get(column) if column else None
    if value is None:
        return [], []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        return [], [Problem(*where, column, "must be a list of image paths")]
    return _image_paths([(item, f"{column}[{i}]") for i, item in enumerate(value)], entry, where)


def _image_paths(items: list[tuple[Any, str]], entry: DatasetEntry,
                 where: tuple[str, int]) -> tuple[list[str], list[Problem]]:
    """The paths of (image entry, its field) pairs, relative ones resolved (`_relative_image`)."""
    paths = []
    for item, field_name in items:
        item, problem = _image_path(item, field_name, where)
        if problem is not None:
            return [], [problem]
        try:
            path = Path(item).expanduser()
        except RuntimeError:  # `~someone/...` for a user this machine does not have
            return [], [Problem(*where, field_name, f"no home directory for {item!r}")]
        paths.append(str(path) if path.is_absolute() else _relative_image(path, entry))
    return paths, []


def _image_path(item: Any, field_name: str, where: tuple[str, int]) -> tuple[str, Problem | None]:
    """The path of one image entry: a string, or a `datasets` export's `{"path": ..., "bytes": null}`."""
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return "", Problem(*where, f"{field_name}.bytes", "embedded image bytes: vlmtune reads image files; "
                                                              "save the images and give their paths")
        item = item.get("path")
        field_name += ".path"
    if not isinstance(item, str):
        shown = repr(item)  # a list of a million paths is not written out in full
        return "", Problem(*where, field_name, f"must be an image path (a string), got "
                                               f"{shown if len(shown) <= 80 else shown[:79] + '…'}")
    scheme = URL_SCHEME.match(item)
    if scheme and scheme[1].lower() == "file":  # a file URL is percent-encoded (a space is %20), as the API reads it
        item, scheme = file_url_path(item), None
    if "\0" in item or not item.strip():
        return "", Problem(*where, field_name, f"not a file path: {item!r}")
    if item[:5].lower() == "data:":
        return "", Problem(*where, field_name, "embedded image bytes (a data: URL): vlmtune reads image files; save "
                                               "the images and give their paths")
    if scheme:  # http, https, s3, ...: not a file here (a relative path "s3:/bucket/a.png" would be looked up)
        return "", Problem(*where, field_name, "an image URL: vlmtune reads image files; download the images and "
                                               "give their paths")
    return item, None


URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _relative_image(path: Path, entry: DatasetEntry) -> str:
    """media_dir (else dataset_dir) / path; as LLaMA-Factory, the path as given (from the current directory) when
    no file is there but one is here. abspath, not resolve(): the same file, without a readlink per path
    component (6 s per 100,000 records); the one stat a path is the check LLaMA-Factory makes."""
    joined = os.path.abspath((entry.media_dir or entry.dataset_dir) / path)
    if not os.path.isfile(joined) and os.path.isfile(path):
        return os.path.abspath(path)
    return joined


def _sharegpt(record: dict, entry: DatasetEntry, where: tuple[str, int],
              in_parts: list[tuple[Any, str]]) -> tuple[list[Message] | None, list[Problem]]:
    """sharegpt and openai records (one layout, as in LLaMA-Factory): a first system message is the system,
    over the system column; tool turns and tool calls are problems of the record, as vlmtune does not train them.
    A content may be a list of parts (`content_parts`); their images are added to `in_parts`."""
    column = entry.columns.get("messages") or "conversations"
    tags = entry.tags
    turns = record.get(column)
    if turns is None:
        return None, [Problem(*where, column, "missing")]
    if not isinstance(turns, list) or not turns:
        return None, [Problem(*where, column, "must be a non-empty list of messages")]
    role_of = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    tool_roles = {tags["observation_tag"], tags["function_tag"]} - set(role_of)
    messages, problems = [], []
    system_column = entry.columns.get("system")
    first_is_system = isinstance(turns[0], dict) and turns[0].get(tags["role_tag"]) == tags["system_tag"]
    if system_column and isinstance(record.get(system_column), str) and not first_is_system:
        messages.append(Message("system", record[system_column], origin=(system_column, system_column)))
    for i, turn in enumerate(turns):
        field_name = f"{column}[{i}]"
        if not isinstance(turn, dict):
            problems.append(Problem(*where, field_name, "message must be an object"))
            continue
        role = turn.get(tags["role_tag"])
        if not isinstance(role, str) or role not in role_of:
            tool = isinstance(role, str) and role in tool_roles
            tools = "; tool turns are not trained by vlmtune" if tool else ""
            problems.append(Problem(*where, f"{field_name}.{tags['role_tag']}",
                                    f"unknown role {role!r} (expected one of {', '.join(role_of)}{tools})"))
            continue
        if turn.get("tool_calls"):  # an openai assistant turn calling a tool (LLaMA-Factory's function turn)
            problems.append(Problem(*where, f"{field_name}.tool_calls", "tool calls are not trained by vlmtune"))
            continue
        content = turn.get(tags["content_tag"])
        if isinstance(content, list):
            content, part_problems = content_parts(content, f"{field_name}.{tags['content_tag']}", where, in_parts)
            problems += part_problems
        if not isinstance(content, str):
            if content is not None or not problems:
                problems.append(Problem(*where, f"{field_name}.{tags['content_tag']}",
                                        "content must be a string or a list of parts"))
            continue
        messages.append(Message(role_of[role], content,
                                origin=(f"{field_name}.{tags['role_tag']}", f"{field_name}.{tags['content_tag']}")))
    return (messages if not problems else None), problems


# Content parts: OpenAI's and ms-swift's ({"type": "text", "text"}, {"type": "image_url", "image_url": {"url"}},
# {"type": "image", "image"}) and LLaMA-Factory v1's ({"type": "text" | "image_url", "value"}).
TEXT_PARTS, IMAGE_PARTS, OTHER_PARTS = ("text",), ("image_url", "image"), ("video", "video_url", "audio", "input_audio")


def content_parts(parts: list, field_name: str, where: tuple[str, int],
                  in_parts: list[tuple[Any, str]]) -> tuple[str | None, list[Problem]]:
    """A content given as a list of parts, as text: text parts joined, an `<image>` placeholder where each image
    part stands (its path added to `in_parts`, in order); other parts are problems of the record."""
    text, problems = [], []
    for j, part in enumerate(parts):
        where_part = f"{field_name}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            value = part.get("text", part.get("value"))
            if not isinstance(value, str):
                problems.append(Problem(*where, where_part, "a text part needs its text (a string)"))
            text.append(value if isinstance(value, str) else "")
        elif kind in IMAGE_PARTS:
            key = next((k for k in (kind, "value", "url", "path") if part.get(k) is not None), kind)
            value = part.get(key)
            if isinstance(value, dict) and "url" in value:  # OpenAI's {"image_url": {"url": ...}}
                value, key = value["url"], f"{key}.url"
            in_parts.append((value, f"{where_part}.{key}"))
            text.append(IMAGE_PLACEHOLDER)
        else:
            what = f"{kind} parts are not read by vlmtune (text and images only)" if kind in OTHER_PARTS else \
                f"unknown part type {kind!r} (expected text, image_url or image)"
            problems.append(Problem(*where, where_part, what))
    return ("".join(text) if not problems else None), problems


def _alpaca(record: dict, entry: DatasetEntry, where: tuple[str, int]) -> tuple[list[Message] | None, list[Problem]]:
    cols = entry.columns
    problems: list[Problem] = []
    messages: list[Message] = []
    if cols.get("system") and isinstance(record.get(cols["system"]), str):
        messages.append(Message("system", record[cols["system"]], origin=(cols["system"], cols["system"])))
    history = record.get(cols["history"]) if cols.get("history") else None
    if history is not None and not isinstance(history, list):
        return None, [Problem(*where, cols["history"], "must be a list of [query, response] pairs")]
    for i, pair in enumerate(history or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            problems.append(Problem(*where, f"{cols['history']}[{i}]", "must be a [query, response] pair"))
            continue
        field_name = f"{cols['history']}[{i}]"
        messages += [Message("user", pair[0], origin=(field_name, f"{field_name}[0]")),
                     Message("assistant", pair[1], origin=(field_name, f"{field_name}[1]"))]
    prompt = record.get(cols["prompt"], "")
    query = record.get(cols["query"], "") if cols.get("query") else ""
    response = record.get(cols["response"])
    for name, value in ((cols["prompt"], prompt), (cols.get("query"), query)):
        if name and value is not None and not isinstance(value, str):
            problems.append(Problem(*where, name, "must be a string"))
    if response is None:
        problems.append(Problem(*where, cols["response"], "missing (no assistant answer)"))
    elif not isinstance(response, str):
        problems.append(Problem(*where, cols["response"], "must be a string"))
    if problems:
        return None, problems
    user = "\n".join(part for part in (prompt, query) if part)
    user_field = cols["prompt"] if prompt or not query else cols["query"]
    messages += [Message("user", user, origin=(user_field, user_field)),
                 Message("assistant", response, origin=(cols["response"], cols["response"]))]
    return messages, []


# LLaMA-Factory's other media: columns (its registry's `columns: {videos: ..., audios: ...}`) and placeholders.
OTHER_MEDIA = {"videos": "<video>", "audios": "<audio>"}


def _media_problems(record: dict, entry: DatasetEntry, where: tuple[str, int],
                    messages: list[Message] | None) -> list[Problem]:
    """Videos and audio are refused by record and field until vlmtune reads them: left out silently, the model
    would train on prompts whose `<video>` is plain text and whose picture is missing."""
    problems = []
    for kind, placeholder in OTHER_MEDIA.items():
        column = entry.columns.get(kind) or kind
        if record.get(column):
            problems.append(Problem(*where, column, f"{kind} are not read by vlmtune (images only): remove them, or "
                                                    f"the record"))
            continue  # one line a kind: its placeholders go with it
        for i, message in enumerate(messages or []):
            if placeholder in message.content:
                problems.append(Problem(*where, message.content_field(i), f"{placeholder} placeholder: vlmtune reads "
                                                                          f"images only"))
                break
    return problems


def structure_problems(conv: Conversation) -> list[Problem]:
    """Role order, empty content, a final assistant answer, and `<image>` count vs images — each named by
    the file's own field (`conversations[3].from`), not vlmtune's."""
    where = (conv.source, conv.index)
    problems = []
    turns = conv.turns
    for i, message in enumerate(conv.messages):
        if message.role == "system" and i > 0:
            problems.append(Problem(*where, message.role_field(i), "system message must come first"))
    expected = "user"
    offset = 1 if conv.system is not None else 0
    for i, message in enumerate(turns):
        if message.role != expected:
            problems.append(Problem(*where, message.role_field(i + offset),
                                    f"expected a {expected} turn, got {message.role} (turns must alternate "
                                    f"user, assistant)"))
            break
        expected = "assistant" if expected == "user" else "user"
    for i, message in enumerate(conv.messages):
        if not message.content.strip() and message.role != "system":
            problems.append(Problem(*where, message.content_field(i), f"empty {message.role} content"))
    if not turns or turns[-1].role != "assistant":
        problems.append(Problem(*where, conv.messages_field, "no assistant answer at the end"))
    placeholders = sum(m.content.count("<image>") for m in conv.messages)
    if placeholders != len(conv.images):
        problems.append(Problem(*where, conv.images_field, f"{placeholders} <image> placeholder(s) in the messages "
                                                           f"but {len(conv.images)} image(s) given"))
    return problems
