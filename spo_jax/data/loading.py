"""Load preference / SFT datasets and normalise them to plain-text columns.

Two steps, both through HF ``datasets`` (memory-mapped Arrow, cached ``map``):

1. :func:`load_rows` reads a Hub id, a local file (json, jsonl, ``.gz``-compressed
   json/jsonl/csv, parquet, csv, arrow) or a local directory (a ``save_to_disk``
   directory, or a folder of data files) into a ``datasets.Dataset``.
2. :func:`standardize` maps any supported row format onto the canonical text
   columns the tokenizer step consumes:

   * preference: ``example_index``, ``prompt``, ``chosen``, ``rejected`` (str)
   * SFT:        ``example_index``, ``prompt``, ``completion`` (str)

   ``example_index`` is the row number in the loaded dataset (before any row
   is dropped); batches carry it so cached reference log-probs can be looked up.

Supported formats (TRL's dataset conventions; the column names are configurable
through ``columns={"canonical": "actual"}``):

* ``preference``: ``prompt``, ``chosen``, ``rejected`` (preference)
* ``implicit_preference``: ``chosen``, ``rejected``; the shared prefix is the prompt (preference)
* ``prompt_completion``: ``prompt``, ``completion`` (sft)
* ``messages``: ``messages``; the last (assistant) message is the response (sft)
* ``question_answer``: ``question``, ``answer`` (GSM8K; rendered with templates) (sft)

Any text field may instead be *conversational*: a list of ``{"role", "content"}``
messages. Conversational rows are rendered with the tokenizer's chat template the
way TRL does it: ``prompt_text = template(prompt, add_generation_prompt=True)``
and ``response_text = template(prompt + response)[len(prompt_text):]``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

__all__ = ["DataError", "PREFERENCE_FORMATS", "SFT_FORMATS", "FORMATS", "REQUIRED_COLUMNS",
           "DEFAULT_PROMPT_TEMPLATE", "DEFAULT_COMPLETION_TEMPLATE", "HH_ASSISTANT_MARKER", "kind_of",
           "load_rows", "json_error_location", "utf8_error_location", "row_location", "detect_format",
           "check_columns", "is_conversational", "extract_prompt", "render_chat", "standardize"]

logger = logging.getLogger(__name__)

class DataError(ValueError):
    """A problem with a dataset (file, line, row or column), named in the message with the fix."""


PREFERENCE_FORMATS = ("preference", "implicit_preference")
SFT_FORMATS = ("prompt_completion", "messages", "question_answer")
FORMATS = PREFERENCE_FORMATS + SFT_FORMATS

#: Canonical columns each format needs (before the ``columns`` renaming).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "question_answer": ("question", "answer"),
}

#: Default GSM8K-style templates (``str.format`` with the row's fields).
DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
DEFAULT_COMPLETION_TEMPLATE = " {answer}"

#: Dialogue marker of HH-RLHF-style transcripts: the implicit prompt ends after its last occurrence.
HH_ASSISTANT_MARKER = "\n\nAssistant:"

_BUILDER_BY_SUFFIX = (
    (".jsonl.gz", "json"), (".json.gz", "json"), (".jsonl", "json"), (".json", "json"),
    (".parquet", "parquet"), (".csv.gz", "csv"), (".csv", "csv"), (".arrow", "arrow"),
)


def kind_of(format: str) -> str:
    """``"preference"`` or ``"sft"`` for a format name (see :data:`FORMATS`)."""
    if format in PREFERENCE_FORMATS:
        return "preference"
    if format in SFT_FORMATS:
        return "sft"
    raise DataError(f"format={format!r} is not supported; use one of {FORMATS} or 'auto'.")


# --------------------------------------------------------------------------- loading


def _builder_for_file(path: str) -> str | None:
    lower = path.lower()
    for suffix, builder in _BUILDER_BY_SUFFIX:
        if lower.endswith(suffix):
            return builder
    return None


def load_rows(
    source: str | os.PathLike,
    *,
    split: str = "train",
    name: str | None = None,
    data_dir: str | None = None,
    data_files: Any = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load raw rows from a Hub id, a local file or a local directory.

    Args:
      source: a file path (``.json``, ``.jsonl``, ``.json[l].gz``, ``.parquet``,
        ``.csv[.gz]``, ``.arrow``), a directory written by ``Dataset.save_to_disk``
        / ``DatasetDict.save_to_disk``, a directory of data files, or a Hub id
        such as ``"Anthropic/hh-rlhf"`` (needs network).
      split: the split to return (of a ``DatasetDict`` on disk, a Hub dataset or a
        data-file directory; a single file is one split, whatever its name), with an
        optional slice in the ``datasets`` syntax: ``"train[:64]"`` (the first 64
        rows), ``"train[100:200]"``, ``"test[:10%]"``, ``"train[-50:]"``.
      name, data_dir, data_files: forwarded to ``datasets.load_dataset`` for Hub
        ids and data-file directories (e.g. ``name="main"`` for ``openai/gsm8k``,
        ``data_dir="harmless-base"`` for ``Anthropic/hh-rlhf``).
      cache_dir: ``datasets`` cache directory.

    Returns:
      a ``datasets.Dataset`` (one split).
    """
    path = os.fspath(source)
    rows = None  # a slice of a file or a save_to_disk split, taken here (datasets slices the others itself)
    if os.path.isfile(path):
        rows = parse_split(split)[1]
        builder = _builder_for_file(path)
        if builder is None:
            raise DataError(
                f"source={path!r}: unknown file type; use one of "
                f"{[s for s, _ in _BUILDER_BY_SUFFIX]} (or convert the file).")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: the file is empty (0 bytes); point the data path at a file with rows.")
        try:
            ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - the Arrow readers' errors name neither file nor line
            where = json_error_location(path) if builder == "json" else utf8_error_location(path)
            if where is None:
                root = e
                while root.__cause__ is not None or root.__context__ is not None:
                    root = root.__cause__ or root.__context__
                first = (str(root).strip().splitlines() or [type(root).__name__])[0][:300]
                where = f"{path}: cannot be read as a {builder} file: {first}"
            raise DataError(where) from e
    elif os.path.isdir(path):
        saved = any(os.path.exists(os.path.join(path, f))
                    for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
        if saved:
            split_name, rows = parse_split(split)
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split_name not in ds:
                    raise DataError(f"split={split_name!r} is not in {path!r}; it holds splits {list(ds)}.")
                ds = ds[split_name]
        else:
            ds = datasets.load_dataset(path, name=name, data_dir=data_dir, data_files=data_files,
                                       split=split, cache_dir=cache_dir)
    else:
        if os.path.isabs(path) or path.startswith(".") or path.count("/") > 1:
            raise DataError(f"source={path!r} does not exist (not a file, directory or Hub id 'owner/name').")
        # Hub id: the real loading path (needs network access to the Hub).
        ds = datasets.load_dataset(path, name=name, data_dir=data_dir, data_files=data_files,
                                   split=split, cache_dir=cache_dir)
    if isinstance(ds, datasets.DatasetDict):  # e.g. split=None forwarded by a caller
        ds = ds[split]
    if rows is not None:
        ds = _slice_rows(ds, rows)
    logger.info("loaded %d rows with columns %s from %s", len(ds), ds.column_names, path)
    return ds


_SPLIT = re.compile(r"^([\w.-]+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, tuple[str | None, str | None] | None]:
    """``"train[:64]"`` -> ``("train", (None, "64"))``; ``"test[10%:20%]"`` -> ``("test", ("10%", "20%"))``;
    ``"train"`` -> ``("train", None)``. ``DataError`` for anything else."""
    m = _SPLIT.match(str(split).replace(" ", ""))
    if m is None:
        raise DataError(f"split={split!r}: not a split name with an optional slice; write e.g. 'train', "
                        "'train[:64]' (the first 64 rows), 'train[100:200]', 'train[-50:]' or 'test[:10%]'")
    name, lo, hi = m.groups()
    return name, ((lo, hi) if "[" in str(split) else None)


def _slice_rows(ds: datasets.Dataset, bounds: tuple[str | None, str | None]) -> datasets.Dataset:
    """The rows of ``ds`` in ``bounds`` (:func:`parse_split`; a bound ``"N%"`` is N% of the rows, rounded)."""
    n = len(ds)

    def at(b):
        return None if b is None else (round(n * int(b[:-1]) / 100) if b.endswith("%") else int(b))

    start, stop, _ = slice(at(bounds[0]), at(bounds[1])).indices(n)
    return ds.select(range(start, max(start, stop)))


def _open_text(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def json_error_location(path: str) -> str | None:
    """``"<path>:<line>: not valid JSON: <why>"`` for the first bad line of a JSON
    Lines file (every non-blank line must be one JSON object), or the position of
    the error in a single-document ``.json`` file; None when Python's ``json``
    reads the file without error (the problem is elsewhere)."""
    with _open_text(path) as f:
        raw = f.read()
    bad = utf8_error_location(path, raw)
    if bad:
        return bad
    text = raw.decode("utf-8")
    if text.lstrip().startswith("["):  # one JSON document (a list of rows)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})."
        return None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno}); each line must be one JSON object."
        if not isinstance(value, dict):
            return f"{path}:{lineno}: not a JSON object (got {type(value).__name__}); each line must be one object."
    return None


def utf8_error_location(path: str, raw: bytes | None = None) -> str | None:
    """``"<path>:<line>: not valid UTF-8 ..."`` for the first bad byte, else None."""
    if raw is None:
        with _open_text(path) as f:
            raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return f"{path}:{line}: not valid UTF-8 (byte {e.start} of the file); save the file as UTF-8."
    return None


def row_location(source: str | None, idx: int) -> str:
    """Where row ``idx`` of a loaded dataset comes from: ``"<file>:<line>"`` for a
    JSON Lines file (blank lines are skipped by the loader, counted here), else
    ``"<source> row <idx>"`` (0-based), or ``"row <idx>"`` for in-memory data."""
    if source and os.path.isfile(source) and _builder_for_file(source) == "json":
        with _open_text(source) as f:
            head = f.read(64).lstrip()
        if not head.startswith(b"["):
            seen = -1
            with _open_text(source) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        seen += 1
                        if seen == idx:
                            return f"{source}:{lineno}"
    return f"{source} row {idx}" if source else f"row {idx}"


# --------------------------------------------------------------------------- formats


def _actual(columns: Mapping[str, str] | None, canonical: str) -> str:
    return (columns or {}).get(canonical, canonical)


def detect_format(column_names: Sequence[str], columns: Mapping[str, str] | None = None) -> str:
    """Guess the row format from the column names (after the ``columns`` renaming).

    Order: preference (prompt/chosen/rejected), implicit_preference (chosen/rejected),
    prompt_completion, messages, question_answer.
    """
    present = set(column_names)
    for fmt in ("preference", "implicit_preference", "prompt_completion", "messages", "question_answer"):
        if all(_actual(columns, c) in present for c in REQUIRED_COLUMNS[fmt]):
            return fmt
    raise DataError(
        f"cannot detect the dataset format from its columns {sorted(present)}; expected one of "
        + "; ".join(f"{f}: {list(REQUIRED_COLUMNS[f])}" for f in FORMATS)
        + ". Rename columns with columns={'chosen': '<your column>', ...} or pass format=...")


def check_columns(column_names: Sequence[str], format: str, columns: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError`` naming the missing columns and the columns present."""
    present = list(column_names)
    missing = [_actual(columns, c) for c in REQUIRED_COLUMNS[format] if _actual(columns, c) not in present]
    if missing:
        raise DataError(
            f"format={format!r} needs column(s) {missing}, but the dataset has columns {present}. "
            f"Map your column names with columns={{'<canonical>': '<yours>'}} "
            f"(canonical names for this format: {list(REQUIRED_COLUMNS[format])}) or pick another format.")


def is_conversational(value: Any) -> bool:
    """True for a list of ``{"role": ..., "content": ...}`` messages."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value))


def _clean_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # Arrow struct columns give every message every key seen in the column (None where absent).
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def extract_prompt(chosen, rejected, *, marker: str | None = HH_ASSISTANT_MARKER):
    """Split implicit-prompt pairs into ``(prompt, chosen_response, rejected_response)``.

    Follows TRL's ``extract_prompt`` (the longest shared prefix is the prompt)
    with two refinements, both so that the prompt ends on a token boundary:

    * strings containing ``marker`` (HH-RLHF "\\n\\nAssistant:") in the shared
      prefix are cut right after its *last* occurrence, so the prompt is the
      dialogue up to and including the final "Assistant:" and the responses are
      the final assistant turns (TRL would also move a shared start of the two
      answers into the prompt);
    * otherwise, as in TRL, a shared trailing space goes to the responses, and a
      cut inside a word backs off to the preceding whitespace (TRL splits
      mid-word, which makes separate tokenization differ from the concatenation).

    Message lists: the prompt is the longest run of equal leading messages.
    """
    if is_conversational(chosen) and is_conversational(rejected):
        chosen, rejected = list(chosen), list(rejected)
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        return chosen[:k], chosen[k:], rejected[k:]
    chosen, rejected = _text(chosen), _text(rejected)
    n = min(len(chosen), len(rejected))
    idx = 0
    while idx < n and chosen[idx] == rejected[idx]:
        idx += 1
    prefix = chosen[:idx]
    if marker and marker in prefix:
        idx = prefix.rindex(marker) + len(marker)
    elif idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    elif idx > 0 and chosen[idx - 1].isalnum() and (
            (idx < len(chosen) and chosen[idx].isalnum()) or (idx < len(rejected) and rejected[idx].isalnum())):
        ws = max(prefix.rfind(c) for c in (" ", "\n", "\t"))
        idx = max(ws, 0)
    return chosen[:idx], chosen[idx:], rejected[idx:]


def render_chat(tokenizer, prompt_messages, response_messages) -> tuple[str, str]:
    """Render (prompt, response) message lists with the tokenizer's chat template.

    ``prompt_text = template(prompt, add_generation_prompt=True)``; ``response_text``
    is the rest of ``template(prompt + response)``. Whitespace the template writes
    after a final EOS token (ChatML's "<|im_end|>\\n") is dropped so the response
    ends with EOS and the tokenizer step does not append a second one.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("conversational rows need a tokenizer with a chat_template; set "
                         "tokenizer.chat_template or convert the rows to plain strings.")
    prompt_messages = _clean_messages(prompt_messages)
    response_messages = _clean_messages(response_messages)
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_messages + response_messages, tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(
            "the chat template renders prompt+response without the generation-prompt rendering of the "
            f"prompt as a prefix (prompt: {prompt_text[-80:]!r}, full: {full[:len(prompt_text) + 40][-120:]!r}); "
            "this template cannot split prompt and response, use plain-string rows instead.")
    response = full[len(prompt_text):]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and response.rstrip().endswith(eos):
        response = response.rstrip()
    return prompt_text, response


def _as_messages(value: Any, role: str) -> list[dict[str, Any]]:
    if is_conversational(value):
        return _clean_messages(value)
    return [{"role": role, "content": _text(value)}]


#: The formats whose text fields may instead be conversational (lists of {"role", "content"} messages).
STRUCTURED_FORMATS = ("preference", "implicit_preference", "prompt_completion", "messages")


def _check_text(value: Any, key: str, format: str, source: str | None, idx: int) -> None:
    """A text field is a string (or a number); in a format of :data:`STRUCTURED_FORMATS` also a
    list of messages. Anything else (a dict, a list of strings) would be trained on as its repr."""
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return
    if format in STRUCTURED_FORMATS and is_conversational(value):
        return
    if format == "messages":
        return  # checked with its own message below
    shown = repr(value)
    raise DataError(
        f"{row_location(source, idx)}: {key!r} is a {type(value).__name__} ({shown[:60]}{'...' if len(shown) > 60 else ''}), "
        f"not text; format {format!r} takes a string here"
        + (" or a list of {'role', 'content'} messages" if format in STRUCTURED_FORMATS else "")
        + f". Structured fields (lists of messages) are accepted by the formats {list(STRUCTURED_FORMATS)}; "
        "put the text itself in the field (or set data.format).")


def _standardize_row(row: dict[str, Any], idx: int, *, format: str, columns, tokenizer,
                     prompt_template: str, completion_template: str, use_chat_template: bool,
                     marker: str | None, source: str | None = None) -> dict[str, Any]:
    for c in REQUIRED_COLUMNS[format]:
        if row.get(_actual(columns, c)) is None:
            raise DataError(
                f"{row_location(source, idx)}: row {idx} has no {_actual(columns, c)!r} (the key is missing or "
                f"null); every {format!r} row needs {[_actual(columns, k) for k in REQUIRED_COLUMNS[format]]}. "
                "Fix or remove the row.")
        _check_text(row[_actual(columns, c)], _actual(columns, c), format, source, idx)
    get = lambda c: row[_actual(columns, c)]  # noqa: E731
    if format == "question_answer":
        fields = {"question": _text(get("question")), "answer": _text(get("answer"))}
        prompt, responses = prompt_template.format(**fields), [completion_template.format(**fields)]
        if use_chat_template:  # the templates give the message contents; strip their glue whitespace
            prompt, responses = [{"role": "user", "content": prompt.strip()}], [
                [{"role": "assistant", "content": responses[0].strip()}]]
    elif format == "messages":
        messages = get("messages")
        if not is_conversational(messages):
            raise DataError(f"{row_location(source, idx)}: column {_actual(columns, 'messages')!r} must be a list of "
                             f"{{'role', 'content'}} messages, got {type(messages).__name__}.")
        messages = _clean_messages(messages)
        if messages[-1].get("role") != "assistant":
            raise DataError(f"{row_location(source, idx)}: the last message must have role 'assistant' (the trained "
                             f"response), got role {messages[-1].get('role')!r}.")
        prompt, responses = messages[:-1], [messages[-1:]]
    elif format == "implicit_preference":
        prompt, c, r = extract_prompt(get("chosen"), get("rejected"), marker=marker)
        responses = [c, r]
    elif format == "preference":
        prompt, responses = get("prompt"), [get("chosen"), get("rejected")]
    else:  # prompt_completion
        prompt, responses = get("prompt"), [get("completion")]

    conversational = is_conversational(prompt) or any(is_conversational(x) for x in responses)
    if use_chat_template and not conversational:
        prompt = _as_messages(prompt, "user")
        responses = [_as_messages(x, "assistant") for x in responses]
        conversational = True
    if conversational:
        empty = prompt is None or (isinstance(prompt, (str, list, tuple)) and len(prompt) == 0)
        prompt_msgs = [] if empty else _as_messages(prompt, "user")
        texts = [render_chat(tokenizer, prompt_msgs, _as_messages(x, "assistant")) for x in responses]
        prompt_text, response_texts = texts[0][0], [t[1] for t in texts]
    else:
        prompt_text, response_texts = _text(prompt), [_text(x) for x in responses]

    out = {"example_index": idx, "prompt": prompt_text}
    names = ("chosen", "rejected") if kind_of(format) == "preference" else ("completion",)
    out.update(zip(names, response_texts))
    return out


def standardize(
    ds: datasets.Dataset,
    *,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    tokenizer=None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    completion_template: str = DEFAULT_COMPLETION_TEMPLATE,
    use_chat_template: bool = False,
    marker: str | None = HH_ASSISTANT_MARKER,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
    source: str | None = None,
) -> tuple[datasets.Dataset, str]:
    """Map rows of any supported format to canonical text columns.

    Args:
      ds: raw rows (:func:`load_rows`).
      format: one of :data:`FORMATS`, or ``"auto"`` (:func:`detect_format`).
      columns: ``{"canonical name": "your column name"}``, e.g. ``{"prompt": "instruction"}``.
      tokenizer: needed for conversational rows (chat template) and ``use_chat_template``.
      prompt_template, completion_template: ``question_answer`` rows become
        ``prompt_template.format(question=..., answer=...)`` and
        ``completion_template.format(...)``.
      use_chat_template: render plain-string rows as a user turn and an assistant
        turn with the tokenizer's chat template.
      marker: dialogue marker for implicit prompts (see :func:`extract_prompt`).
      num_proc: ``datasets.map`` worker processes.
      source: the file the rows came from, named (with the line) in row errors.

    Returns:
      ``(dataset, format)``: columns ``example_index, prompt, chosen, rejected``
      (preference) or ``example_index, prompt, completion`` (sft); the resolved format.
    """
    if format == "auto":
        format = detect_format(ds.column_names, columns)
        logger.info("detected dataset format %r from columns %s", format, ds.column_names)
    kind_of(format)  # validates the name
    check_columns(ds.column_names, format, columns)
    if format == "question_answer":
        for tname, tmpl in (("prompt_template", prompt_template), ("completion_template", completion_template)):
            try:
                tmpl.format(question="", answer="")
            except (KeyError, IndexError) as e:
                raise DataError(f"{tname}={tmpl!r} uses an unknown field {e}; available: {{question}}, "
                                 "{answer}.") from None
    if (use_chat_template or format == "messages") and tokenizer is None:
        raise DataError(f"format={format!r} / use_chat_template={use_chat_template} needs tokenizer=... "
                         "(its chat template renders the messages).")
    if ds.num_rows and tokenizer is None:
        first = ds[0]
        if any(is_conversational(first[c]) for c in ds.column_names if c in first):
            raise DataError("the rows are conversational (lists of messages); pass tokenizer=... "
                             "so its chat template can render them.")
    try:
        out = _map_rows(ds, format, columns, tokenizer, prompt_template, completion_template, use_chat_template,
                        marker, num_proc, load_from_cache_file, source)
    except UnicodeDecodeError as e:  # Arrow keeps invalid bytes; they fail when a row is read
        where = utf8_error_location(source) if source and os.path.isfile(source) else None
        raise DataError(where or f"{source or 'the dataset'}: text that is not valid UTF-8 ({e})") from e
    return out, format


def _map_rows(ds, format, columns, tokenizer, prompt_template, completion_template, use_chat_template, marker,
              num_proc, load_from_cache_file, source):
    return ds.map(
        _standardize_row,
        with_indices=True,
        remove_columns=ds.column_names,
        fn_kwargs=dict(format=format, columns=dict(columns or {}), tokenizer=tokenizer,
                       prompt_template=prompt_template, completion_template=completion_template,
                       use_chat_template=use_chat_template, marker=marker, source=source),
        num_proc=num_proc if (num_proc or 0) > 1 and ds.num_rows > 1 else None,
        load_from_cache_file=load_from_cache_file,
        desc=f"standardizing {format} rows",
    )
