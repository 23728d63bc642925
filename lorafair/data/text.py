"""Text data: classification and instruction files read with Hugging Face `datasets`, split into clients.

Rows are grouped into domains by a domain (task) column and partitioned like images (`lorafair.data.partition`):
one client per domain, Dirichlet over a label or category column, or IID. Examples are tokenized lazily, when a
sampled client reads them, so a round costs what its sampled clients hold whatever the number of clients. Every
item is padded to text.max_length so torch's default collate stacks a batch; the model trims the columns a batch
does not use. An item is (inputs, target) with inputs = stack(token ids, attention mask):

- classification: right-padded text (or text pair), target = class index;
- instruction, training: prompt + response + EOS right-padded, target = the token ids with the prompt and the
  padding set to -100 (the loss covers the response only);
- instruction, test: inputs = stack(prompt ids, prompt mask, ids, mask, labels): the prompt left-padded (for
  batched generation), then the training item's three rows (for the eval loss over the response tokens); target =
  the code points of the reference's final answer (padded with -1), compared with the answer extracted from the
  generated text.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from lorafair.config import FitConfig, ModelConfig, TextConfig
from lorafair.data import arithmetic
from lorafair.data.cache import cache_dir
from lorafair.data.federated import Client, FederatedData
from lorafair.data.partition import partition
from lorafair.errors import UserError

IGNORE_INDEX = -100
"""Label of the positions the loss skips (prompt and padding): torch's cross_entropy default."""
ANSWER_WIDTH = 32
"""Characters of a reference answer kept in a test item's target."""
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass
class Rows:
    """Examples of one split: per row its domain, its class or category index and its fields (classification:
    (text, text pair or None); instruction: (prompt, response, reference answer))."""

    domains: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    examples: list[tuple] = field(default_factory=list)

    def select(self, positions: list[int]) -> Rows:
        return Rows([self.domains[i] for i in positions], [self.labels[i] for i in positions],
                    [self.examples[i] for i in positions])


# ---- answers ----------------------------------------------------------------------------------------------------


def extract_answer(text: str, pattern: str) -> str | None:
    """The final answer in `text`: the first group that took part in the first match of `pattern` (the whole match
    when it has no group), stripped, without thousands separators or a trailing full stop; None when nothing
    matches."""
    found = re.search(pattern, text)
    if found is None:
        return None
    answer = next((group for group in found.groups() if group is not None), found.group(0))
    return answer.strip().replace(",", "").rstrip(".")


def answer_codes(answer: str) -> Tensor:
    codes = [ord(c) for c in answer[:ANSWER_WIDTH]]
    return torch.tensor(codes + [-1] * (ANSWER_WIDTH - len(codes)))


def answers_from_codes(codes: Tensor) -> list[str]:
    return ["".join(chr(c) for c in row if c >= 0) for row in codes.tolist()]


# ---- reading files ----------------------------------------------------------------------------------------------


def _line(path: Path, row: int) -> str:
    """Where row `row` (0-based) of a file is, for messages: a line number for text files."""
    if path.suffix in (".jsonl", ".json"):
        return f"{path}, line {row + 1}"
    if path.suffix in (".csv", ".tsv"):
        return f"{path}, line {row + 2}"  # after the header
    return f"{path}, row {row + 1}"


def _first_bad_json_line(path: Path) -> str:
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                return f"{path}, line {number}: not a JSON object"
        except json.JSONDecodeError as err:
            return f"{path}, line {number}: not valid JSON ({err.msg})"
    return f"{path}: cannot be read as JSON lines"


TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
"""Data files read as text, which must be UTF-8."""


def _require_utf8(path: Path) -> None:
    """One UserError naming the first line of `path` that is not UTF-8 (read line by line, never whole)."""
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}, line {number}: not UTF-8 text (byte 0x{line[err.start]:02x} at byte "
                                f"{err.start + 1} of the line); save the file as UTF-8") from err


def read_table(path: Path, columns: list[str], cache: Path | None, optional: tuple[str, ...] = ()) -> dict[str, list]:
    """The named columns of a data file (JSON lines, CSV, TSV or parquet), read with `datasets`; `optional` ones
    are left out when the file lacks them."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if path.suffix not in BUILDERS:
        raise UserError(f"{path}: unknown text file type {path.suffix!r}; use one of {', '.join(BUILDERS)}")
    if not path.is_file():
        raise UserError(f"{path}: no such file; check text.train_files / text.test_files")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    if path.suffix in TEXT_SUFFIXES:
        _require_utf8(path)
    options = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        table = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train",
                                      cache_dir=str(cache / "datasets") if cache else None, **options)
    except Exception as err:  # datasets wraps parser errors in several types; name the line where we can
        if BUILDERS[path.suffix] == "json":
            raise UserError(_first_bad_json_line(path)) from err
        raise UserError(f"{path}: cannot be read as {path.suffix[1:]} ({str(err).splitlines()[0]})") from err
    if len(table) == 0:
        raise UserError(f"{path}: the file has no rows")
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (its columns: {', '.join(table.column_names)}); name the "
                        f"right one in the text settings")
    return {column: table[column] for column in (*columns, *optional) if column in table.column_names}


def _domains(table: dict[str, list], text_cfg: TextConfig, size: int) -> list[str]:
    column = text_cfg.domain_column
    return ["all"] * size if column is None else [str(value) for value in table[column]]


def _check_present(values: list, path: Path, column: str) -> None:
    for row, value in enumerate(values):
        if value is None:
            raise UserError(f"{_line(path, row)}: column {column!r} is empty")


def read_classification(paths: list[Path], text_cfg: TextConfig, classes: list[str] | None,
                        cache: Path | None) -> tuple[Rows, list[str]]:
    """Rows of classification files and the class names (given, else the sorted labels found)."""
    columns = [*text_cfg.text_columns, text_cfg.label_column] + ([text_cfg.domain_column] if text_cfg.domain_column
                                                                 else [])
    tables = [(path, read_table(path, columns, cache)) for path in paths]
    if classes is None:
        found = {str(v) for _, table in tables for v in table[text_cfg.label_column] if v is not None}
        classes = sorted(found, key=lambda v: (0, int(v), v) if re.fullmatch(r"-?\d+", v) else (1, 0, v))
    index = {name: i for i, name in enumerate(classes)}
    rows = Rows()
    for path, table in tables:
        for column in columns:
            if column != text_cfg.text_columns[-1] or len(text_cfg.text_columns) == 1:  # a pair may lack its second
                _check_present(table[column], path, column)
        texts = table[text_cfg.text_columns[0]]
        pairs = table[text_cfg.text_columns[1]] if len(text_cfg.text_columns) == 2 else [None] * len(texts)
        for row, label in enumerate(table[text_cfg.label_column]):
            if str(label) not in index:
                raise UserError(f"{_line(path, row)}: label {label!r} is not one of the classes ({', '.join(classes)}"
                                f"); fix the row or text.classes")
            rows.labels.append(index[str(label)])
        rows.domains += _domains(table, text_cfg, len(texts))
        rows.examples += [(str(text), None if pair is None else str(pair)) for text, pair in zip(texts, pairs,
                                                                                               strict=True)]
    return rows, classes


def instruction_rows(records: list[dict], text_cfg: TextConfig, where: list[str]) -> Rows:
    """Rows of instruction records (instruction, input, output[, domain][, category]): prompt, response, answer."""
    rows = Rows()
    for record, place in zip(records, where, strict=True):
        answer = extract_answer(record["output"], text_cfg.answer_pattern)
        if answer is None:
            raise UserError(f"{place}: the output has no final answer matching text.answer_pattern "
                            f"{text_cfg.answer_pattern!r}")
        prompt = text_cfg.prompt_template.format(instruction=record["instruction"], input=record["input"])
        rows.examples.append((prompt, record["output"], answer))
        rows.domains.append(record["domain"])
        rows.labels.append(record["category"])
    return rows


def read_instructions(paths: list[Path], text_cfg: TextConfig, cache: Path | None) -> list[tuple[list[dict],
                                                                                                  list[str]]]:
    """Per file, its records in the Alpaca layout (a missing input column reads as empty) and where each is."""
    read = []
    for path in paths:
        named = [c for c in (text_cfg.domain_column, text_cfg.category_column) if c]
        table = read_table(path, ["instruction", "output", *named], cache, optional=("input",))
        for column in ("instruction", "output"):
            _check_present(table[column], path, column)
        size = len(table["output"])
        inputs = table.get("input", [""] * size)
        categories = table[text_cfg.category_column] if text_cfg.category_column else ["all"] * size
        records = [{"instruction": str(table["instruction"][i]), "input": "" if inputs[i] is None else str(inputs[i]),
                    "output": str(table["output"][i]), "domain": domain, "category": str(categories[i])}
                   for i, domain in enumerate(_domains(table, text_cfg, size))]
        read.append((records, [_line(path, row) for row in range(size)]))
    return read


def _categorize(read: list[tuple[list[dict], list[str]]], categories: list[str] | None) -> list[str]:
    """Replace each record's category by its index (test categories unseen in training count as the first)."""
    if categories is None:
        categories = sorted({record["category"] for records, _ in read for record in records})
    index = {name: i for i, name in enumerate(categories)}
    for records, _ in read:
        for record in records:
            record["category"] = index.get(record["category"], 0)
    return categories


def read_splits(cfg: FitConfig) -> tuple[Rows, Rows | None, list[str]]:
    """(training rows, test rows or None to split them off, classes or categories) of the configured data."""
    text_cfg, cache = cfg.text, cache_dir(cfg.data.cache)
    if cfg.data.name == "arithmetic":
        splits = [arithmetic.problems(kind, text_cfg.examples_per_kind, text_cfg.test_per_kind, cfg.seed)
                  for kind in cfg.data.domains or arithmetic.KINDS]
        train, test = ([{**row, "domain": row["kind"], "category": 0} for split in splits for row in split[part]]
                       for part in (0, 1))
        return (instruction_rows(train, text_cfg, ["arithmetic"] * len(train)),
                instruction_rows(test, text_cfg, ["arithmetic"] * len(test)), ["all"])
    if cfg.is_text_classifier:
        train, classes = read_classification(text_cfg.train_files, text_cfg, text_cfg.classes, cache)
        test = read_classification(text_cfg.test_files, text_cfg, classes, cache)[0] if text_cfg.test_files else None
        return train, test, classes
    train_read = read_instructions(text_cfg.train_files, text_cfg, cache)
    categories = _categorize(train_read, None)
    test_read = read_instructions(text_cfg.test_files, text_cfg, cache)
    _categorize(test_read, categories)

    def rows_of(read: list[tuple[list[dict], list[str]]]) -> Rows:
        return instruction_rows([r for records, _ in read for r in records], text_cfg,
                                [w for _, where in read for w in where])

    return rows_of(train_read), rows_of(test_read) if test_read else None, categories


# ---- tokenization -----------------------------------------------------------------------------------------------


def _pad_right(ids: list[int], length: int, pad: int) -> tuple[list[int], list[int]]:
    ids = ids[:length]
    return ids + [pad] * (length - len(ids)), [1] * len(ids) + [0] * (length - len(ids))


def encode_classification(tokenizer, text: str, pair: str | None, max_length: int) -> Tensor:
    """stack(ids, mask) of a text (pair), cut and right-padded to max_length."""
    ids = tokenizer(text, pair, truncation=True, max_length=max_length)["input_ids"]
    return torch.tensor(_pad_right(ids, max_length, tokenizer.pad_token_id))


def encode_instruction(tokenizer, prompt: str, response: str, max_length: int) -> tuple[Tensor, Tensor]:
    """(stack(ids, mask), labels) of prompt + response + EOS: the labels are the ids on the response and its EOS,
    IGNORE_INDEX on the prompt and the padding. Prompt and response are tokenized apart, so the boundary is exact.
    Too long: the prompt loses its start, then the response its end (at least one response token stays)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    response_ids = response_ids[:max_length - 1]
    prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), max_length - len(response_ids)):]
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    ids, mask = _pad_right(prompt_ids + response_ids, max_length, tokenizer.pad_token_id)
    labels = (labels + [IGNORE_INDEX] * max_length)[:max_length]
    return torch.tensor([ids, mask]), torch.tensor(labels)


def encode_prompt(tokenizer, prompt: str, max_length: int) -> Tensor:
    """stack(ids, mask) of a prompt, its last max_length tokens, left-padded (for batched generation)."""
    ids = tokenizer(prompt)["input_ids"][-max_length:]
    pad = max_length - len(ids)
    return torch.tensor([[tokenizer.pad_token_id] * pad + ids, [0] * pad + [1] * len(ids)])


def encode_test_instruction(tokenizer, prompt: str, response: str, max_length: int) -> Tensor:
    """stack(prompt ids, prompt mask, ids, mask, labels): the prompt to generate from (`encode_prompt`) and the
    training item (`encode_instruction`) whose response tokens give the eval loss."""
    inputs, labels = encode_instruction(tokenizer, prompt, response, max_length)
    return torch.cat([encode_prompt(tokenizer, prompt, max_length), inputs, labels[None]])


class TextDataset(Dataset):
    """Rows tokenized when read. `labels` (class or category per row) is what partitions split by; `reads`
    counts the items read, to show that a round reads only what its sampled clients hold."""

    def __init__(self, rows: Rows, tokenizer, task: str, train: bool, max_length: int) -> None:
        self.rows, self.tokenizer, self.task, self.train, self.max_length = rows, tokenizer, task, train, max_length
        self.labels = np.asarray(rows.labels, dtype=np.int64)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.rows.examples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor | int]:
        self.reads += 1
        example = self.rows.examples[index]
        if self.task == "classification":
            return encode_classification(self.tokenizer, *example, self.max_length), int(self.labels[index])
        prompt, response, answer = example
        if self.train:
            return encode_instruction(self.tokenizer, prompt, response, self.max_length)
        return encode_test_instruction(self.tokenizer, prompt, response, self.max_length), answer_codes(answer)


# ---- clients ----------------------------------------------------------------------------------------------------


def load_tokenizer(model_cfg: ModelConfig):
    """The tokenizer of model.tokenizer (else model.name): a local folder (also beside the package) or a hub name;
    without a padding token it pads with EOS."""
    from transformers import AutoTokenizer

    from lorafair.weights import resolve_weights_path

    source = model_cfg.tokenizer or model_cfg.name
    local = resolve_weights_path(Path(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else source)
    except (OSError, ValueError) as err:
        raise UserError(f"model.tokenizer: cannot load a tokenizer from {source!r} (not a tokenizer folder, or a hub "
                        f"name that cannot be reached); set model.tokenizer") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _positions_by_domain(domains: list[str]) -> dict[str, list[int]]:
    """Domain -> the positions of its rows, domains in order of first appearance."""
    members: dict[str, list[int]] = {}
    for position, domain in enumerate(domains):
        members.setdefault(domain, []).append(position)
    return members


def _split_off_test(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Per domain, a seeded share `fraction` of the rows (at least one) for testing."""
    train, test = [], []
    for domain, members in _positions_by_domain(rows.domains).items():
        random.Random(f"{seed}:{domain}").shuffle(members)
        cut = max(1, round(fraction * len(members)))
        test += members[:cut]
        train += members[cut:]
    return rows.select(sorted(train)), rows.select(sorted(test))


def build_text_data(cfg: FitConfig, tokenizer) -> FederatedData:
    """Clients and per-domain test sets of the text data, partitioned as images are (federation settings)."""
    train_rows, test_rows, classes = read_splits(cfg)
    if test_rows is None:
        train_rows, test_rows = _split_off_test(train_rows, cfg.data.test_fraction, cfg.seed)
    task = "classification" if cfg.is_text_classifier else "instruction"
    members = _positions_by_domain(train_rows.domains)
    names = list(members)
    train = TextDataset(train_rows.select([i for name in names for i in members[name]]), tokenizer, task, True,
                        cfg.text.max_length)
    bounds = np.cumsum([0] + [len(members[name]) for name in names])
    domain_labels = [train.labels[bounds[d]:bounds[d + 1]] for d in range(len(names))]
    test_members = _positions_by_domain(test_rows.domains)
    missing = [name for name in names if name not in test_members]
    if missing:
        raise UserError(f"domain(s) {', '.join(missing[:5])} have no test rows; add them to text.test_files")
    parts = partition(domain_labels, names, cfg.federation, cfg.seed)
    clients = [Client(id=i, domain="mixed" if part.domain is None else names[part.domain],
                      dataset=Subset(train, part.indices.tolist()), num_samples=len(part.indices),
                      class_counts=np.bincount(train.labels[part.indices], minlength=len(classes)).tolist())
               for i, part in enumerate(parts)]
    test = {name: TextDataset(test_rows.select(test_members[name]), tokenizer, task, False, cfg.text.max_length)
            for name in names}
    return FederatedData(clients=clients, test=test, domains=names, classes=classes,
                         train={name: Subset(train, range(bounds[d], bounds[d + 1])) for d, name in enumerate(names)})
