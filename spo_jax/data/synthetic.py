"""A synthetic multi-step arithmetic reasoning task in GSM8K format, shipped as code.

A problem starts with a count, applies 2-4 operations and asks for the result::

    question: "Ben has 14 cookies . He sells 12 . He gets 24 more . He doubles them .
               How many cookies does he have ?"
    answer:   "14 - 12 = 2 . 2 + 24 = 26 . 26 * 2 = 52 . #### 52"

Words, numbers and punctuation are separated by single spaces; the answer ends in
``#### N`` so :func:`spo_jax.data.gsm8k.extract_answer` reads it. The language is
deliberately regular (one sentence template per operation phrase, one equation per
step) so that a tiny decoder learns it within minutes on a CPU; difficulty comes
from the arithmetic (number of steps, operand sizes, carries).

Difficulty knobs (keyword arguments of :func:`make_splits` / :func:`generate`,
validated by :class:`Difficulty`):

* ``steps=(2, 4)``: the number of operations, drawn uniformly from the closed range;
* ``start_range=(2, 30)``: the starting count;
* ``operand_range=(1, 20)``: the ``n`` of ``+n`` / ``-n``;
* ``ops=("add", "sub", "mul2", "mul3")``: ``+n``, ``-n``, ``*2``, ``*3``;
* ``max_value=200``: every intermediate value stays in ``[0, max_value]`` (an
  operation that would leave it is not drawn).

Splits are fixed by the seed and disjoint: the test problems are drawn first (stream
``[seed, 1]``), then the training problems (stream ``[seed, 0]``) skipping every
problem whose arithmetic (start, operations, operands) occurs in the test split, so
no question -- not even with other names or objects -- appears in both.

The tokenizer (:func:`build_tokenizer`) is a ``transformers.PreTrainedTokenizerFast``
built in code from the generator's vocabulary: words and symbols are whole tokens,
numbers are split into one token per digit. Digits are WordPiece pieces -- a leading
digit ``"5"`` and a continuation digit ``"@@2"`` -- so that ``decode`` joins them back
into ``"52"`` with the standard WordPiece decoder (a WordLevel model with a
``Digits(individual_digits=True)`` pre-tokenizer gives the same ids per digit value but
decodes ``"5 2"``, from which no answer can be read). Everything is serialisable:
``save_pretrained`` / ``AutoTokenizer.from_pretrained(dir)`` round-trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from spo_jax.data import gsm8k

__all__ = [
    "CHAT_TEMPLATE",
    "Difficulty",
    "OPS",
    "build_tokenizer",
    "generate",
    "make_splits",
    "score",
    "vocabulary",
]

# Names with their pronoun; objects; one phrase list per operation ("{n}" is the operand).
NAMES: dict[str, str] = {"Ben": "he", "Tom": "he", "Sam": "he", "Max": "he",
                         "Ana": "she", "Mia": "she", "Eva": "she", "Zoe": "she"}
OBJECTS: tuple[str, ...] = ("cookies", "apples", "coins", "marbles", "stamps", "books")
OPS: dict[str, tuple[str, ...]] = {
    "add": ("gets {n} more", "buys {n} more", "finds {n} more"),
    "sub": ("sells {n}", "gives away {n}", "loses {n}"),
    "mul2": ("doubles them",),
    "mul3": ("triples them",),
}
_SYMBOL = {"add": "+", "sub": "-", "mul2": "*", "mul3": "*"}

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
CONTINUATION_PREFIX = "@@"

#: Same rendering as ``loading``'s default GSM8K templates ("Question: {q}\nAnswer:" + " {a}"),
#: with BOS in front and EOS after the assistant turn. Only user and assistant roles.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Answer: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('the synthetic task has only user and assistant turns, got role '"
    " + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """The task's knobs; every range is closed. Raises ``ValueError`` on an impossible setting."""

    steps: tuple[int, int] = (2, 4)
    start_range: tuple[int, int] = (2, 30)
    operand_range: tuple[int, int] = (1, 20)
    ops: tuple[str, ...] = ("add", "sub", "mul2", "mul3")
    max_value: int = 200

    def __post_init__(self):
        for name, lowest in (("steps", 1), ("start_range", 0), ("operand_range", 1)):
            value = getattr(self, name)
            if (not isinstance(value, Sequence) or len(value) != 2
                    or not all(isinstance(v, (int, np.integer)) for v in value)
                    or value[0] < lowest or value[1] < value[0]):
                raise ValueError(f"Difficulty.{name}={value!r} must be a (low, high) pair of ints with "
                                 f"{lowest} <= low <= high.")
            object.__setattr__(self, name, (int(value[0]), int(value[1])))
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        unknown = [op for op in ops if op not in OPS]
        if not ops or unknown:
            raise ValueError(f"Difficulty.ops={self.ops!r}: unknown or empty; choose a non-empty subset of "
                             f"{list(OPS)}.")
        object.__setattr__(self, "ops", ops)
        if not isinstance(self.max_value, (int, np.integer)) or self.max_value < self.start_range[1]:
            raise ValueError(f"Difficulty.max_value={self.max_value!r} must be an int >= the largest start "
                             f"value {self.start_range[1]} (start_range={self.start_range}).")

    @classmethod
    def from_kwargs(cls, **difficulty) -> Difficulty:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(difficulty) - known)
        if unknown:
            raise ValueError(f"unknown difficulty knob(s) {unknown}; the knobs are {sorted(known)}.")
        return cls(**difficulty)


def _operand_range(op: str, value: int, cfg: Difficulty) -> tuple[int, int] | None:
    """Closed range of operands keeping the result in [0, max_value]; None if ``op`` is impossible."""
    lo, hi = cfg.operand_range
    if op == "add":
        hi = min(hi, cfg.max_value - value)
    elif op == "sub":
        hi = min(hi, value)
    else:
        factor = 2 if op == "mul2" else 3
        return (factor, factor) if value * factor <= cfg.max_value else None
    return (lo, hi) if lo <= hi else None


def _apply(op: str, value: int, operand: int) -> int:
    if op == "add":
        return value + operand
    if op == "sub":
        return value - operand
    return value * operand


def _draw(rng: np.random.Generator, cfg: Difficulty) -> tuple[int, tuple[tuple[str, int], ...]]:
    """One problem's arithmetic ``(start, ((op, operand), ...))``, every value within bounds."""
    for _ in range(100):
        value = start = int(rng.integers(cfg.start_range[0], cfg.start_range[1] + 1))
        n_steps = int(rng.integers(cfg.steps[0], cfg.steps[1] + 1))
        chain = []
        for _ in range(n_steps):
            options = [(op, r) for op in cfg.ops if (r := _operand_range(op, value, cfg)) is not None]
            if not options:
                break
            op, (lo, hi) = options[int(rng.integers(len(options)))]
            operand = int(rng.integers(lo, hi + 1))
            chain.append((op, operand))
            value = _apply(op, value, operand)
        else:
            return start, tuple(chain)
    raise ValueError(f"cannot draw a problem with {cfg}: no allowed operation keeps the values in "
                     f"[0, {cfg.max_value}]; widen max_value / operand_range or add operations.")


def _render(rng: np.random.Generator, start: int, chain) -> dict[str, str]:
    name = list(NAMES)[int(rng.integers(len(NAMES)))]
    pronoun = NAMES[name]
    obj = OBJECTS[int(rng.integers(len(OBJECTS)))]
    sentences = [f"{name} has {start} {obj} ."]
    steps = []
    value = start
    for op, operand in chain:
        phrases = OPS[op]
        phrase = phrases[int(rng.integers(len(phrases)))].format(n=operand)
        sentences.append(f"{pronoun.capitalize()} {phrase} .")
        new = _apply(op, value, operand)
        steps.append(f"{value} {_SYMBOL[op]} {operand} = {new} .")
        value = new
    sentences.append(f"How many {obj} does {pronoun} have ?")
    return {"question": " ".join(sentences), "answer": " ".join(steps + [f"#### {value}"])}


def _generate(n: int, rng: np.random.Generator, cfg: Difficulty, exclude: set) -> tuple[list[dict], set]:
    rows, keys = [], set()
    misses = 0
    while len(rows) < n:
        key = _draw(rng, cfg)
        if key in exclude or key in keys:
            misses += 1
            if misses > 100 * n + 1000:
                raise ValueError(f"only {len(rows)} distinct problems found for n={n} with {cfg}; the "
                                 "problem space is too small: widen the ranges or ask for fewer problems.")
            continue
        keys.add(key)
        rows.append(_render(rng, *key))
    return rows, keys


def generate(n: int, seed: int = 0, **difficulty) -> list[dict]:
    """``n`` distinct problems ``{"question", "answer"}`` from the stream ``default_rng([seed, 0])``.

    Distinct means distinct arithmetic (start, operations, operands). The first ``k``
    rows do not depend on ``n``.
    """
    _check_count("n", n)
    cfg = Difficulty.from_kwargs(**difficulty)
    return _generate(n, np.random.default_rng([seed, 0]), cfg, set())[0]


def make_splits(n_train: int, n_test: int, seed: int = 0, **difficulty) -> tuple[list[dict], list[dict]]:
    """Fixed, disjoint train / test splits of the task.

    Returns ``(train_rows, test_rows)``, lists of ``{"question": str, "answer": str}``.
    The test split depends only on ``(n_test, seed, difficulty)``; the training split
    on those and ``n_train``, and its first ``k`` rows do not depend on ``n_train``.
    No problem's arithmetic (hence no question) occurs in both.
    """
    _check_count("n_train", n_train)
    _check_count("n_test", n_test)
    cfg = Difficulty.from_kwargs(**difficulty)
    test, test_keys = _generate(n_test, np.random.default_rng([seed, 1]), cfg, set())
    train, _ = _generate(n_train, np.random.default_rng([seed, 0]), cfg, test_keys)
    return train, test


def _check_count(name: str, n) -> None:
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{name}={n!r} must be a non-negative int.")


def score(question_row: Mapping[str, str], generated_text: str) -> dict:
    """Score a generated solution: ``{"correct": bool, "answer": str | None}``.

    ``answer`` is :func:`spo_jax.data.gsm8k.extract_answer` of the text (``#### N`` first,
    then "the answer is N", then the last number); ``correct`` compares it with the
    row's ``#### N``.
    """
    if not isinstance(question_row, Mapping) or "answer" not in question_row:
        raise ValueError("score(question_row=...) needs a row with an 'answer' field (as made by make_splits), "
                         f"got {question_row!r:.120}.")
    answer = gsm8k.extract_answer(generated_text)
    return {"correct": gsm8k.is_correct(generated_text, question_row["answer"]), "answer": answer}


def vocabulary() -> list[str]:
    """Every token, in id order: specials, digits, continuation digits, symbols, words."""
    words = {"has", "How", "many", "does", "have", "them", "Question", "Answer"}
    words.update(NAMES)
    words.update(p for pronoun in NAMES.values() for p in (pronoun, pronoun.capitalize()))
    words.update(OBJECTS)
    for phrases in OPS.values():
        for phrase in phrases:
            words.update(w for w in phrase.split() if w != "{n}")
    digits = [str(d) for d in range(10)]
    symbols = [".", "?", ":", "=", "+", "-", "*", "####"]
    return [PAD, UNK, BOS, EOS] + digits + [CONTINUATION_PREFIX + d for d in digits] + symbols + sorted(words)


def build_tokenizer(model_max_length: int = 256):
    """The task's tokenizer as a ``transformers.PreTrainedTokenizerFast`` (deterministic, no files).

    * pre-tokenizer ``Whitespace`` (``\\w+|[^\\w\\s]+``): words and symbol runs (``####``);
    * model ``WordPiece`` over :func:`vocabulary`: a word is one token; a number is its
      leading digit then ``@@d`` continuation digits (``"52" -> ["5", "@@2"]``); anything
      else is ``<unk>``;
    * post-processor: ``<s>`` before every text (``tokenizer(text)`` starts with BOS;
      ``add_special_tokens=False`` leaves it out); EOS is the data pipeline's to append;
    * decoder ``WordPiece(prefix="@@", cleanup=False)``: tokens joined by spaces,
      continuation digits glued on -- ``decode(encode(answer))`` gives the answer text back;
    * special tokens ``<pad>`` (id 0), ``<unk>``, ``<s>``, ``</s>``, and :data:`CHAT_TEMPLATE`.
    """
    # heavy (transformers takes seconds to import); only building the tokenizer needs them
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    backend = Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX,
                                         max_input_chars_per_word=100))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab[BOS])])
    backend.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX, cleanup=False)
    backend.add_special_tokens([PAD, UNK, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )
