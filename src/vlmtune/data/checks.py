"""Checks before any GPU time: everything wrong with the data, one line per problem.

Record structure (roles, empty content, `<image>` count) is checked while converting
(`formats.structure_problems`); here come the images (exist, readable: from the header, or with
`decode` every pixel — `vlmtune data check` decodes, since a truncated file has a good header) and,
with a processor, each sample's token count against cutoff_len. Image token counts come from Qwen's
smart resize of the header size, so they equal what encoding will produce.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from vlmtune.data.conversation import Conversation, Problem
from vlmtune.data.images import ImageError, header_size, sequence_tokens, token_count
from vlmtune.labels import label_set_notes, near_duplicates


@dataclass
class SampleStats:
    image_tokens: int
    total_tokens: int


@dataclass
class CheckResult:
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, SampleStats] = field(default_factory=dict)  # conversation id → token counts

    def bad_ids(self) -> set[tuple[str, int]]:
        return {(p.file, p.record) for p in self.problems if p.record is not None}


def check_conversations(conversations: list[Conversation], processor=None, cutoff_len: int | None = None,
                        default_system: str | None = None, decode: bool = False) -> CheckResult:
    """Image problems for every conversation (with `decode`, found by decoding every image, not only its
    header); with a processor, token counts and cutoff_len overruns."""
    result = CheckResult()
    to_count = []  # (conversation, image token counts, rendered text), tokenised TOKENIZE_BATCH at a time
    for conv in conversations:
        sizes = []
        for i, path in enumerate(conv.images):
            try:
                sizes.append(header_size(path, decode=decode))
            except ImageError as exc:
                result.problems.append(Problem(conv.source, conv.index, conv.image_field(i), f"{exc}: {path}"))
        if processor is None or len(sizes) != len(conv.images):
            continue
        from vlmtune.data.encode import EncodeError, check_length  # torch: only with a model

        try:  # a 1 MB record is not tokenised
            check_length(conv.messages, cutoff_len, "cutoff_len", field=conv.messages_field)
        except EncodeError as exc:
            result.problems.append(Problem(conv.source, conv.index, exc.field, str(exc)))
            continue
        try:
            counts = [token_count(w, h, processor.image_processor) for w, h in sizes]
        except ImageError as exc:
            result.problems.append(Problem(conv.source, conv.index, conv.images_field, str(exc)))
            continue
        # One pad per image, counted out afterwards: the same total as tokenising every pad (see
        # data.encode.tokenize_rendered), in a third of the time.
        to_count.append((conv, counts, processor.template.render(conv.messages, [1] * len(counts), default_system).text))
        if len(to_count) == TOKENIZE_BATCH:
            _count_tokens(to_count, processor, cutoff_len, result)
            to_count = []
    if to_count:
        _count_tokens(to_count, processor, cutoff_len, result)
    result.problems += answer_problems(conversations)
    return result


def answer_problems(conversations: list[Conversation]) -> list[Problem]:
    """Each answer that differs from a more frequent one only by width, case or trailing punctuation
    (`labels.near_duplicates`: `적합。` among `적합`), named by record: two spellings of one label would be two
    classes."""
    answers = [c.answer for c in conversations]
    counts = Counter(answers)
    problems = []
    for i, answer, usual in near_duplicates(answers):
        conv = conversations[i]
        problems.append(Problem(conv.source, conv.index, conv.messages[-1].content_field(len(conv.messages) - 1),
                                f"answer {answer!r} differs from {usual!r} (the answer of {counts[usual]} records) "
                                f"only by width, case or trailing punctuation; write it as {usual!r}"))
    return problems


def _count_tokens(to_count: list, processor, cutoff_len: int | None, result: CheckResult) -> None:
    """Token counts of rendered conversations, tokenised together (the fast tokenizer runs a batch in
    parallel, in Rust), and the cutoff_len overruns."""
    ids = processor.tokenizer([text for _, _, text in to_count], add_special_tokens=False)["input_ids"]
    for (conv, counts, _), text_ids in zip(to_count, ids):
        total = sequence_tokens(len(text_ids), counts)
        result.stats[conv.id] = SampleStats(sum(counts), total)
        if cutoff_len is not None and total > cutoff_len:
            result.problems.append(Problem(conv.source, conv.index, conv.messages_field,
                                           f"{total} tokens ({sum(counts)} image tokens + prompt + answer) do "
                                           f"not fit in cutoff_len {cutoff_len}; raise cutoff_len or lower "
                                           f"image_max_pixels"))


TOKENIZE_BATCH = 1024


def label_notes(conversations: list[Conversation], labels: list[str] | None = None) -> list[str]:
    """`labels.label_set_notes` of these conversations' answers, records named by file and index: the lines every
    command that reads answers says at the start (every answer one label, too many answers for a label set, a
    third label in a few records)."""
    return label_set_notes([c.answer for c in conversations], labels,
                           [f"{c.source}: record {c.index}" for c in conversations])


def without_bad(conversations: list[Conversation], problems: list[Problem]) -> list[Conversation]:
    bad = {(p.file, p.record) for p in problems if p.record is not None}
    return [c for c in conversations if (c.source, c.index) not in bad]


def answer_distribution(conversations: list[Conversation]) -> Counter:
    return Counter(c.answer for c in conversations)


def describe_distribution(counter: Counter) -> str:
    total = sum(counter.values()) or 1
    return ", ".join(f"{answer} {n} ({100 * n / total:.1f}%)" for answer, n in counter.most_common(8)) + (
        f", … {len(counter) - 8} more" if len(counter) > 8 else "")


def describe_tokens(values: list[int]) -> str:
    if not values:
        return "n/a"
    return f"min {min(values)} / median {statistics.median(values):g} / max {max(values)}"
