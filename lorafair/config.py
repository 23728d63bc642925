"""Typed settings for every command. One dataclass per section of a YAML config (litgpt style).

Field docstrings are what `lorafair fit --help` prints, so they say what a value means and which values are valid.
Checks that need more than one section live in `FitConfig.validate`.
"""

from __future__ import annotations

import math
import os
import re
import string
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Literal

from lorafair.aggregation import (
    OptionError,
    build_aggregator,
    method_class,
    method_options,
    registered_methods,
    user_options,
)
from lorafair.errors import UserError


class ConfigError(UserError):
    """A setting is impossible. The message names the key and the valid values; the CLI prints it as one line."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


TEXT_DATA = ("text_classification", "instruction", "arithmetic")
"""data.name values read as text: their model family is transformers."""
GENERATED_ANSWER_DATA = ("instruction", "arithmetic")
"""data.name values a causal language model answers, scored by the exact match of its final answer."""


def metric_name(data_name: str) -> str:
    """What a domain's score measures for data.name: the exact match of the generated final answer (instruction
    data and the arithmetic demo), else the top-1 accuracy of the predicted class."""
    return "exact match" if data_name in GENERATED_ANSWER_DATA else "top-1 accuracy"


def _require_finite(values: dict[str, float | None]) -> None:
    """YAML can spell .nan and .inf, which slip past every comparison-based check."""
    for key, value in values.items():
        _require(value is None or math.isfinite(value), key, f"must be a finite number, got {value}")


@dataclass
class ModelConfig:
    """The frozen backbone."""

    family: Literal["timm", "transformers"] | None = None
    """timm (images) or transformers (language models); None infers it from data.name (text data: transformers)."""
    name: str = "vit_base_patch16_224.augreg_in21k"
    """timm: model name, e.g. vit_base_patch16_224.augreg_in21k or mixer_b16_224.goog_in21k; or mlp_mixer for timm's
    MlpMixer built from kwargs alone (timm's mixer_* names reject overrides such as num_blocks or embed_dim).
    transformers: a local model folder (config.json and weights), a hub name with pretrained true, or a model type
    (llama, roberta, ...) built at random from kwargs (for tests)."""
    pretrained: bool = False
    """Let timm fetch the pretrained weights for `name` from a model hub (needs network)."""
    weights: Path | None = None
    """Local weight file (.safetensors, .npz or .pth) loaded into the backbone; the classifier head is dropped.
    Takes precedence over pretrained. A relative path is looked up in the working directory, then beside the
    installed package (so lorafair/assets/demo_vit.safetensors works from anywhere)."""
    kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for timm.create_model (e.g. depth, embed_dim, img_size for small models), or for the
    transformers config of a model built at random (e.g. hidden_size, num_hidden_layers)."""
    tokenizer: str | None = None
    """transformers: tokenizer folder or hub name; None uses model.name."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """transformers: storage dtype of the frozen weights (LoRA factors and heads stay float32)."""
    gradient_checkpointing: bool = False
    """transformers: recompute activations in the backward pass (less memory, more time)."""
    load_in_4bit: bool = False
    """transformers: 4-bit NF4 frozen weights through bitsandbytes (QLoRA); needs CUDA and bitsandbytes."""

    def resolved_family(self, data_name: str) -> str:
        """The family: as set, else transformers for text data and timm for images."""
        return self.family or ("transformers" if data_name in TEXT_DATA else "timm")

    def validate(self) -> None:
        _require(bool(self.name), "model.name", "must be a model name")
        reserved = sorted(set(self.kwargs) & set(RESERVED_MODEL_KWARGS))
        _require(not reserved, "model.kwargs", f"{', '.join(reserved)} cannot be set here: "
                 f"{RESERVED_MODEL_KWARGS[reserved[0]] if reserved else ''}")


RESERVED_MODEL_KWARGS = {
    "checkpoint_path": "load a weight file with model.weights (read with weights_only, the head dropped)",
    "pretrained_cfg": "model.name and model.pretrained choose the pretrained configuration",
    "pretrained_cfg_overlay": "model.name and model.pretrained choose the pretrained configuration",
    "pretrained": "set model.pretrained",
    "num_classes": "the number of classes comes from the data (data.num_classes)",
}
"""timm.create_model arguments that lorafair sets itself, or that would load files behind model.weights' checks."""


@dataclass
class LoraConfig:
    """The LoRA adapters (peft) placed on the backbone's linear layers."""

    r: int = 16
    """LoRA rank, > 0: the global model's rank, and the largest a client may have."""
    alpha: float = 16.0
    """LoRA alpha; the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input, in [0, 1)."""
    target_modules: str | None = None
    """Regex matched against full module names. None uses the model's default (ViT: attn.proj and mlp.fc2;
    Mixer: mlp_tokens.fc2 and mlp_channels.fc2), which never touches patch_embed."""
    client_ranks: list[int] | dict[str, int] | None = None
    """Clients of different ranks: None gives every client lora.r; a list is cycled over client ids (e.g.
    [4, 8, 16]); a mapping domain -> rank sets each domain's clients (domains left out get lora.r). Each client
    trains with its own scaling alpha / rank."""

    def rank_of(self, clients: list[tuple[int, str]], domains: list[str]) -> dict[int, int]:
        """Client id -> its LoRA rank, for (id, domain) pairs; an unknown domain is a ConfigError."""
        ranks = self.client_ranks
        if isinstance(ranks, dict):
            unknown = sorted(set(ranks) - set(domains))
            _require(not unknown, "lora.client_ranks", f"unknown domain(s) {', '.join(unknown)}; the domains are "
                     f"{', '.join(domains)}")
            return {client: ranks.get(domain, self.r) for client, domain in clients}
        if ranks:
            return {client: ranks[client % len(ranks)] for client, _ in clients}
        return {client: self.r for client, _ in clients}

    @property
    def has_lower_ranks(self) -> bool:
        """Whether some client trains a rank below lora.r."""
        ranks = self.client_ranks.values() if isinstance(self.client_ranks, dict) else self.client_ranks or []
        return any(rank != self.r for rank in ranks)

    def validate(self) -> None:
        _require_finite({"lora.alpha": self.alpha, "lora.dropout": self.dropout})
        _require(self.r > 0, "lora.r", f"must be a positive integer, got {self.r}")
        ranks = list(self.client_ranks.values()) if isinstance(self.client_ranks, dict) else self.client_ranks or []
        _require(self.client_ranks != [], "lora.client_ranks", "must be null, a non-empty list or a mapping")
        for rank in ranks:
            _require(isinstance(rank, int) and 0 < rank <= self.r, "lora.client_ranks",
                     f"every rank must be an integer in [1, lora.r = {self.r}] (lora.r is the largest, the global "
                     f"model's rank), got {rank!r}")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class DataConfig:
    """Where the images come from and how they are loaded."""

    name: Literal["domainnet", "nicopp", "folders", "digits", "shapes", "text_classification", "instruction",
                  "arithmetic"] = "domainnet"
    """Dataset: domainnet, nicopp, folders (<root>/<domain>/<class>/<image>), shapes (generated offline benchmark,
    the demo) or digits (embedded offline demo);
    text (see the text section): text_classification or instruction files, or arithmetic (generated offline demo)."""
    root: Path | None = None
    """Dataset root folder (not used by digits and shapes)."""
    domains: list[str] | None = None
    """Domains to use, in this order. None uses all of the dataset's domains."""
    num_classes: int | None = None
    """Keep classes whose label is below this (DomainNet default 100 as in the paper). None uses the default."""
    test_fraction: float = 0.2
    """Share of each domain held out for testing where the dataset has no split files (folders, digits)."""
    train_per_class: int | None = None
    """shapes: training images per class and domain (None: 12)."""
    test_per_class: int | None = None
    """shapes: test images per class and domain (None: 100)."""
    image_size: int | None = None
    """Override the input size; None takes it from the model's timm data config."""
    augment: bool = False
    """Random resized crop and horizontal flip at train time (off in the paper)."""
    batch_size: int = 128
    """Local training batch size."""
    eval_batch_size: int = 256
    """Evaluation batch size."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 loads in the main process)."""
    on_bad_image: Literal["error", "skip"] = "error"
    """What to do with an unreadable image: stop with its path, or skip it and report the count."""
    cache: str = "auto"
    """Decode-once image cache (not used by digits and shapes): auto (under $LORAFAIR_CACHE_DIR, else
    $XDG_CACHE_HOME/lorafair, else ~/.cache/lorafair), a folder to keep it in, or off to decode every image with PIL
    at every read."""

    def validate(self) -> None:
        _require(self.name in ("digits", "shapes", *TEXT_DATA) or self.root is not None, "data.root",
                 f"is required for data.name={self.name}: pass --data.root DIR")
        _require(self.image_size is None or self.image_size > 0, "data.image_size",
                 f"must be > 0 pixels or null (the model's size), got {self.image_size}")
        _require(0 < self.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _require(self.batch_size > 0, "data.batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.eval_batch_size > 0, "data.eval_batch_size", f"must be > 0, got {self.eval_batch_size}")
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        for name in ("train_per_class", "test_per_class"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"data.{name}", f"must be > 0 or null, got {value}")
        _require(self.num_classes is None or self.num_classes > 0, "data.num_classes",
                 f"must be > 0, got {self.num_classes}")
        _require(bool(self.cache), "data.cache", "must be auto, off or a folder, got an empty value")
        _require(self.domains is None or len(self.domains) > 0, "data.domains",
                 "must list at least one domain, or be null for all of the dataset's domains")


ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
"""The Alpaca prompt; an empty input leaves its "### Input" block in, as the public FedIT code does."""


@dataclass
class TextConfig:
    """Text data (data.name text_classification, instruction or arithmetic): files, columns and tokenization."""

    train_files: list[Path] = field(default_factory=list)
    """Training files (.jsonl/.json, .csv, .tsv, .parquet), read with Hugging Face datasets."""
    test_files: list[Path] = field(default_factory=list)
    """Test files in the same layout; empty: each domain's rows are split by data.test_fraction."""
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    """text_classification: the text column, or two for sentence pairs (GLUE: [premise, hypothesis])."""
    label_column: str = "label"
    """text_classification: the class label column (names or integers)."""
    classes: list[str] | None = None
    """text_classification: the class names in label order; None: the sorted labels of the training files."""
    domain_column: str | None = None
    """Column naming each row's domain or task (the feature partition gives one client per value); None: one domain."""
    category_column: str | None = None
    """instruction: column whose values play the role of classes for the feature_label (Dirichlet) partition."""
    prompt_template: str = ALPACA_TEMPLATE
    """instruction: the prompt, with {instruction} and {input}; the loss covers the response after it only."""
    answer_pattern: str = r"####\s*(-?[\d,.]+)"
    """instruction: regex whose first group is the final answer in a response (GSM8K's '#### 42' by default);
    exact match compares the answers of the generated and the reference response (commas removed)."""
    max_length: int = 256
    """Tokens per training example (longer ones are cut) and per evaluation prompt."""
    max_new_tokens: int = 32
    """instruction: cap on the tokens generated greedily per test prompt."""
    examples_per_kind: int = 400
    """arithmetic: training problems per kind of problem."""
    test_per_kind: int = 2000
    """arithmetic: test problems per kind of problem."""

    def validate(self) -> None:
        _require(self.max_length > 1, "text.max_length", f"must be > 1, got {self.max_length}")
        _require(self.max_new_tokens > 0, "text.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _require(len(self.text_columns) in (1, 2), "text.text_columns", f"must name 1 or 2 columns, got "
                 f"{self.text_columns}")
        _require(self.examples_per_kind > 0 and self.test_per_kind > 0, "text.examples_per_kind",
                 "and text.test_per_kind must be > 0")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name is not None}
        except ValueError as err:
            raise UserError(f"text.prompt_template: {self.prompt_template!r} is not a valid template ({err}); write "
                            f"literal braces as {{{{ and }}}}") from err
        _require(fields <= {"instruction", "input"}, "text.prompt_template",
                 f"{self.prompt_template!r} uses {', '.join(sorted(fields - {'instruction', 'input'}))}; only "
                 f"{{instruction}} and {{input}} are filled in (write literal braces as {{{{ and }}}})")
        try:
            groups = re.compile(self.answer_pattern).groups
        except re.error as err:
            raise UserError(f"text.answer_pattern: {self.answer_pattern!r} is not a valid regex ({err})") from err
        _require(groups >= 1, "text.answer_pattern",
                 f"{self.answer_pattern!r} has no group; its first group (...) must capture the answer")


MAX_TIMEOUT = 7 * 24 * 3600.0
"""The longest federation.timeout: torch's collectives hold it in milliseconds in a C integer."""
MAX_SEED = 2**32 - 1

BOUNDS = ("centralized", "local")
"""The reference settings of federation.setting, selected in compare like methods."""
BOUND_METHOD = "fedit"
"""The server method a bound runs with: it takes its one update as it is (FedIT's average of one), or none."""
BASELINE = "fedit"
"""The method a comparison measures every other against, unless told otherwise."""


def comparable() -> tuple[str, ...]:
    """What a comparison can run (all of it by default) and the order of its tables and plot colours: every
    registered method, then the bounds."""
    return (*registered_methods(), *BOUNDS)


@dataclass
class FederationConfig:
    """How the data is split into clients and how rounds proceed."""

    rounds: int = 50
    """Communication rounds."""
    partition: Literal["feature", "feature_label", "iid"] = "feature"
    """feature: one client per domain; feature_label: clients_per_domain clients per domain with Dirichlet label
    skew; iid: num_clients clients drawn uniformly from all domains."""
    clients_per_domain: int = 1
    """Clients per domain for the feature_label partition."""
    num_clients: int = 6
    """Number of clients for the iid partition."""
    dirichlet_alpha: float = 0.5
    """Dirichlet concentration of the label skew (smaller is more skewed)."""
    min_client_samples: int = 10
    """A feature_label draw leaving a client with fewer samples is re-drawn."""
    clients_per_round: int | None = None
    """Clients sampled each round; None means all."""
    eval_every: int = 1
    """Evaluate the global model every this many rounds (and always after the last)."""
    on_bad_update: Literal["drop", "error"] = "drop"
    """A client update with NaN/Inf or a diverged loss: drop it from the round, or stop the run."""
    setting: Literal["federated", "centralized", "local"] = "federated"
    """federated: the server aggregates with server.method. The two bounds a comparison measures methods against:
    centralized: one client holding every client's data, training as many steps a round as the sampled clients
    together; local: each client trains alone, never aggregated, scored on its own domain."""
    timeout: float = 600.0
    """Seconds a rank waits at a collective (gather, broadcast, barrier) before it stops with the round it was in; it
    must exceed the longest wait there, i.e. the slowest rank's local training in a round. Multi-process runs only."""

    def validate(self) -> None:
        _require_finite({"federation.dirichlet_alpha": self.dirichlet_alpha, "federation.timeout": self.timeout})
        _require(0 < self.timeout <= MAX_TIMEOUT, "federation.timeout",
                 f"must be > 0 and at most {MAX_TIMEOUT:.0f} seconds (7 days), got {self.timeout:g}")
        _require(self.rounds > 0, "federation.rounds", f"must be > 0, got {self.rounds}")
        _require(self.clients_per_domain > 0, "federation.clients_per_domain",
                 f"must be > 0, got {self.clients_per_domain}")
        _require(self.num_clients > 0, "federation.num_clients", f"must be > 0, got {self.num_clients}")
        _require(self.dirichlet_alpha > 0, "federation.dirichlet_alpha", f"must be > 0, got {self.dirichlet_alpha}")
        _require(self.min_client_samples >= 1, "federation.min_client_samples",
                 f"must be >= 1, got {self.min_client_samples}")
        _require(self.clients_per_round is None or self.clients_per_round > 0, "federation.clients_per_round",
                 f"must be > 0, got {self.clients_per_round}")
        _require(self.eval_every > 0, "federation.eval_every", f"must be > 0, got {self.eval_every}")
        _require(self.clients_per_domain == 1 or self.partition == "feature_label", "federation.clients_per_domain",
                 f"{self.clients_per_domain} applies to partition feature_label only; partition {self.partition} "
                 f"gives {'one client per domain' if self.partition == 'feature' else 'federation.num_clients clients'}"
                 f": set partition feature_label, or leave clients_per_domain at 1")
        _require(self.setting != "local" or self.partition != "iid", "federation.setting",
                 "local scores each client on its own domain, which clients of the iid partition do not have; use "
                 "partition feature or feature_label")


@dataclass
class ClientConfig:
    """Local training on each client (SGD, as in the paper and its public code)."""

    local_epochs: int = 2
    """Passes over the client's data per round."""
    max_local_steps: int | None = None
    """Cap on optimizer steps per round; None means no cap."""
    lr: float = 0.01
    """SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum (optimizer state is reset every round)."""
    weight_decay: float = 1e-5
    """SGD weight decay."""
    grad_clip: float | None = 10.0
    """Clip the gradient norm to this value; None disables clipping."""

    def validate(self) -> None:
        _require_finite({"client.lr": self.lr, "client.momentum": self.momentum,
                         "client.weight_decay": self.weight_decay, "client.grad_clip": self.grad_clip})
        _require(self.local_epochs > 0, "client.local_epochs", f"must be > 0, got {self.local_epochs}")
        _require(self.max_local_steps is None or self.max_local_steps > 0, "client.max_local_steps",
                 f"must be > 0, got {self.max_local_steps}")
        _require(self.lr > 0, "client.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, "client.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, "client.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip is None or self.grad_clip > 0, "client.grad_clip",
                 f"must be > 0 or null, got {self.grad_clip}")


def _validate_server(self) -> None:
    """The method is registered, and every option passes the checks of each method that declares it (an option
    the chosen method ignores is still checked, so a config stays valid whatever method it is run with)."""
    methods = registered_methods()
    _require(self.method in methods, "server.method",
             f"{self.method!r} is not valid; choose one of {', '.join(methods)}")
    for method in methods:
        options = {name: getattr(self, name) for name in method_options(method) if name in user_options()}
        try:
            build_aggregator(method, **options)
        except OptionError as err:
            raise ConfigError(f"server.{err.option}: {err.problem}") from err


def _server_config_class() -> type:
    """ServerConfig from the method registry: `method` plus one field per option of any method."""
    options = user_options()
    methods = ", ".join(registered_methods())
    docs = [f"    method: Aggregation method: {methods}.",
            *(f"    {o.name}: {', '.join(o.methods)}: {o.doc}" for o in options.values())]
    doc = "The aggregation method and its options. Options a method does not use are ignored by it.\n\n" \
          "Args:\n" + "\n".join(docs)
    return make_dataclass("ServerConfig", [("method", str, field(default="lorafair")),
                                           *((o.name, o.type, field(default=o.default)) for o in options.values())],
                          namespace={"validate": _validate_server, "__doc__": doc, "__module__": __name__})


ServerConfig = _server_config_class()
"""Built when lorafair.config is first imported: methods registered before that are part of it."""


@dataclass
class FitConfig:
    """Everything `lorafair fit` needs; the YAML configs mirror this structure."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)  # type: ignore[valid-type]
    text: TextConfig = field(default_factory=TextConfig)
    seed: int = 0
    """Seeds everything: the partition, client sampling, LoRA inits and each client's local training."""
    out_dir: Path = Path("runs/lorafair")
    """Run folder: config.yaml, classes.json, results.json, tensorboard/ and checkpoints/."""
    export: bool = True
    """After the last round, write out_dir/final/: the global model exported for timm (or transformers) and peft,
    about twice the size of the backbone. false skips it (results.json, checkpoints and TensorBoard are written
    either way); `lorafair export --run OUT_DIR` writes it later from the run's newest checkpoint."""
    resume: str | None = "auto"
    """auto: continue from the newest checkpoint in out_dir, or start if there is none, so re-running a command after
    a kill continues it; a path: from that checkpoint; null: start a new run (refused where out_dir holds an earlier
    run's checkpoints or finished results, unless overwrite)."""
    overwrite: bool = False
    """Start a new run from round 1, deleting the checkpoints and results.json an earlier run left in out_dir (the
    only way lorafair deletes finished work)."""
    resume_force: bool = False
    """Resume even from a checkpoint written with other settings (model, LoRA, partition, method, ...), listing the
    differences as a warning. The results then match no uninterrupted run; tensors must still fit the model."""
    accelerator: str = "auto"
    """Lightning Fabric accelerator: auto, cpu, cuda or gpu."""
    precision: Literal["32-true", "bf16-mixed"] | None = None
    """Numerics of local training and evaluation; None: bf16-mixed on CUDA, 32-true otherwise."""
    num_nodes: int = 1
    """Nodes of a torchrun job (each runs one process per device); 1 for a single machine."""
    cpu_threads: int | None = None
    """Threads each process gives torch's CPU operations; None keeps torch's default (torchrun sets 1). Small models
    run fastest on one thread, especially on a busy machine."""

    @property
    def is_language_model(self) -> bool:
        """Whether the run's model is a transformers language model (reading text), else a timm image model: the
        one question every part that depends on the model family asks."""
        return self.model.resolved_family(self.data.name) == "transformers"

    @property
    def is_text_classifier(self) -> bool:
        """Whether the run's model is a transformers sequence classifier (text_classification data: one label per
        text, a classifier head); the other language models are causal LMs that generate their answers."""
        return self.data.name == "text_classification"

    def clients_keep_their_own(self) -> bool:
        """Whether the method's clients keep anything of their own at an evaluation (`ClientRule.personal`), which
        then scores each client's own model on its own domain: round r's evaluation takes round r + 1's rule."""
        options = {name: getattr(self.server, name) for name in method_options(self.server.method)
                   if name in user_options()}
        server = build_aggregator(self.server.method, **options)
        return any(server.client_rule(r).personal for r in range(2, self.federation.rounds + 2))

    def validate(self) -> None:
        for section in (self.server, self.model, self.lora, self.data, self.federation, self.client, self.text):
            section.validate()
        family = self.model.resolved_family(self.data.name)
        _require((family == "transformers") == (self.data.name in TEXT_DATA), "model.family",
                 f"{family} cannot read data.name {self.data.name}: text data needs transformers, images timm")
        _require(not self.model.load_in_4bit or not method_class(self.server.method).merges, "model.load_in_4bit",
                 f"{self.server.method} merges LoRA products into the frozen weights, which 4-bit weights cannot "
                 f"take; use another method or 16-bit weights")
        _require(not self.model.load_in_4bit or not method_class(self.server.method).starts_from_gradient,
                 "model.load_in_4bit", f"{self.server.method} starts from the gradient of the loss at the frozen "
                 "weights, which 4-bit weights do not have; use another method or 16-bit weights")
        _require(self.federation.partition != "iid" or self.federation.setting != "federated"
                 or not self.clients_keep_their_own(), "federation.partition",
                 f"iid gives no client a domain of its own, yet {self.server.method}'s clients keep factors of their "
                 f"own and each client's own model is scored on its own domain's test set; use partition feature or "
                 f"feature_label")
        mixed = method_class(self.server.method).mixed_ranks or self.federation.setting != "federated"
        _require(mixed or not self.lora.has_lower_ranks, "lora.client_ranks",
                 f"{self.server.method} takes no clients of different ranks; leave lora.client_ranks unset (every "
                 f"client at lora.r = {self.lora.r}) or use another method")
        _require(self.data.name not in ("text_classification", "instruction") or bool(self.text.train_files),
                 "text.train_files", f"is required for data.name={self.data.name}: pass --text.train_files FILE")
        _require(0 <= self.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED}, got {self.seed}")
        _require(self.num_nodes >= 1, "num_nodes", f"must be >= 1, got {self.num_nodes}")
        cpus = os.cpu_count() or 1
        _require(self.cpu_threads is None or 1 <= self.cpu_threads <= cpus, "cpu_threads",
                 f"must be in 1..{cpus} (this machine's CPUs) or null, got {self.cpu_threads}")
        _require(self.resume in (None, "auto") or Path(self.resume).exists(), "resume",
                 f"must be 'auto' or an existing checkpoint file, got {self.resume!r}")
        _require(not self.overwrite or self.resume in (None, "auto"), "overwrite",
                 f"starts a new run, which contradicts --resume {self.resume}; drop one of them")
        _require(not self.resume_force or self.resume is not None, "resume_force",
                 "only applies with --resume auto or --resume PATH")
