"""The one shape every dataset record becomes, and the problems found on the way."""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Message:
    role: str  # system | user | assistant
    content: str
    # Where the role and the content are in the dataset file, in its own terms (`conversations[3].from`,
    # `conversations[3].value`; alpaca: `instruction`, `output`), for messages that name a field.
    origin: tuple[str, str] | None = field(default=None, compare=False, repr=False)

    def role_field(self, index: int) -> str:
        return self.origin[0] if self.origin else f"messages[{index}].role"

    def content_field(self, index: int) -> str:
        return self.origin[1] if self.origin else f"messages[{index}].content"


@dataclass
class Conversation:
    """A training or evaluation sample: turns, image paths (absolute), and where it came from."""

    messages: list[Message]
    images: list[str]
    source: str  # the dataset file
    index: int  # record index in that file (0-based)
    dataset: str = ""
    id: str = ""
    # The file's own names of the messages and images columns, for messages that name a field.
    messages_field: str = field(default="messages", compare=False, repr=False)
    images_field: str = field(default="images", compare=False, repr=False)
    # Each image's own field where the images are not a column's items (content parts: `messages[0].content[1].image`).
    image_fields: list[str] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{self.dataset}-{self.index}"

    def image_field(self, index: int) -> str:
        """Where image `index` is given in the dataset file."""
        return self.image_fields[index] if index < len(self.image_fields) else f"{self.images_field}[{index}]"

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None

    @property
    def turns(self) -> list[Message]:
        """The messages without the system prompt."""
        return self.messages[1:] if self.system is not None else self.messages

    @property
    def answer(self) -> str | None:
        """The final assistant answer (the label for classification data)."""
        turns = self.turns
        return turns[-1].content if turns and turns[-1].role == "assistant" else None

    @property
    def prompt(self) -> str:
        """The last user turn's text (with its `<image>` placeholders)."""
        users = [m.content for m in self.turns if m.role == "user"]
        return users[-1] if users else ""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, as a line that names file, record and field."""

    file: str
    record: int | None
    field: str | None
    message: str
    fatal: bool = False  # the dataset itself cannot be read (no record can be used)

    def __str__(self) -> str:
        parts = [self.file]
        if self.record is not None:
            parts.append(f"record {self.record}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts) + f": {self.message}"


@dataclass
class LoadedData:
    """Conversations that passed the record checks, and every problem found."""

    conversations: list[Conversation] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
