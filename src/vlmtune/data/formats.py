"""Read dataset files (json / jsonl) and convert sharegpt or alpaca records into Conversations.

Conversion never stops at the first bad record: each problem is recorded with file, record index and
field, so `vlmtune data check` can list them all and training can skip them when asked.
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any

from vlmtune.data.conversation import Conversation, LoadedData, Message, Problem
from vlmtune.data.registry import DatasetEntry
from vlmtune.errors import VlmtuneError
from vlmtune.files import decode_text, parse_json
from vlmtune.labels import normalize_answer


# A jsonl line that did not parse (already reported): not the same as a `null` record, which is reported.
UNPARSED = object()


def read_records(path: Path) -> tuple[list[Any], list[Problem]]:
    """All records of a .json (a list) or .jsonl file; unreadable lines become problems.

    The file must be UTF-8 (a BOM is dropped); a file that cannot be read at all is one fatal problem.
    """
    if not path.is_file():
        return [], [Problem(str(path), None, None, "dataset file not found", fatal=True)]
    try:
        text = decode_text(path.read_bytes(), path)
    except OSError as exc:
        return [], [Problem(str(path), None, None, f"cannot read ({exc.strerror or exc})", fatal=True)]
    except VlmtuneError as exc:
        return [], [Problem(str(path), None, None, str(exc).removeprefix(f"{path}: "), fatal=True)]
    if path.suffix == ".jsonl":
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


def load_entry(entry: DatasetEntry, max_samples: int | None = None) -> LoadedData:
    """Convert the records of one registry entry, keeping the first max_samples."""
    records, problems = read_records(entry.path)
    if not records and not problems:
        problems = [Problem(str(entry.path), None, None, "no records (the file holds no record)", fatal=True)]
    if max_samples is not None:
        records = records[:max_samples]
    out = LoadedData(problems=list(problems))
    convert = _sharegpt if entry.formatting == "sharegpt" else _alpaca
    messages_field = (entry.columns.get("messages") or "conversations") if entry.formatting == "sharegpt" \
        else entry.columns.get("prompt") or "instruction"
    for index, record in enumerate(records):
        if record is UNPARSED:
            continue
        where = (str(entry.path), index)
        if not isinstance(record, dict):
            got = "null" if record is None else type(record).__name__
            out.problems.append(Problem(*where, None, f"record must be a JSON object, got {got}"))
            continue
        messages, record_problems = convert(record, entry, where)
        images, image_problems = _images(record, entry, where)
        record_problems += image_problems + _media_problems(record, entry, where, messages)
        if messages is not None and not record_problems:
            normalize_final_answer(messages)
            conv = Conversation(messages=messages, images=images, source=str(entry.path), index=index,
                                dataset=entry.name, messages_field=messages_field,
                                images_field=entry.columns.get("images") or "images")
            record_problems += structure_problems(conv)
            if not record_problems:
                out.conversations.append(conv)
        out.problems += record_problems
    return out


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
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return [], [Problem(*where, column, "must be a list of image paths")]
    paths = []
    for i, item in enumerate(value):
        if "\0" in item or not item.strip():
            return [], [Problem(*where, f"{column}[{i}]", f"not a file path: {item!r}")]
        try:
            path = Path(item).expanduser()
        except RuntimeError:  # `~someone/...` for a user this machine does not have
            return [], [Problem(*where, f"{column}[{i}]", f"no home directory for {item!r}")]
        # abspath, not resolve(): the same file, without a readlink per path component (6 s per 100,000 records)
        paths.append(str(path) if path.is_absolute() else os.path.abspath((entry.media_dir or entry.dataset_dir) / path))
    return paths, []


def _sharegpt(record: dict, entry: DatasetEntry, where: tuple[str, int]) -> tuple[list[Message] | None, list[Problem]]:
    column = entry.columns.get("messages") or "conversations"
    tags = entry.tags
    turns = record.get(column)
    if turns is None:
        return None, [Problem(*where, column, "missing")]
    if not isinstance(turns, list) or not turns:
        return None, [Problem(*where, column, "must be a non-empty list of messages")]
    role_of = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages, problems = [], []
    system_column = entry.columns.get("system")
    if system_column and isinstance(record.get(system_column), str):
        messages.append(Message("system", record[system_column], origin=(system_column, system_column)))
    for i, turn in enumerate(turns):
        field_name = f"{column}[{i}]"
        if not isinstance(turn, dict):
            problems.append(Problem(*where, field_name, "message must be an object"))
            continue
        role = turn.get(tags["role_tag"])
        if not isinstance(role, str) or role not in role_of:
            allowed = ", ".join(role_of)
            problems.append(Problem(*where, f"{field_name}.{tags['role_tag']}",
                                    f"unknown role {role!r} (expected one of {allowed})"))
            continue
        content = turn.get(tags["content_tag"])
        if not isinstance(content, str):
            problems.append(Problem(*where, f"{field_name}.{tags['content_tag']}", "content must be a string"))
            continue
        messages.append(Message(role_of[role], content,
                                origin=(f"{field_name}.{tags['role_tag']}", f"{field_name}.{tags['content_tag']}")))
    return (messages if not problems else None), problems


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
