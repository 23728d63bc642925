"""`lorafair data`: build a config's datasets and partition and show them, without loading any model weights."""

from __future__ import annotations

from pathlib import Path

from lorafair.config import FitConfig
from lorafair.data.build import build_data
from lorafair.data.federated import FederatedData, build_caches
from lorafair.data.transforms import model_data_config


def summary_table(fd: FederatedData, ranks: dict[int, int]) -> str:
    """One row per client (domain, training samples, classes present, LoRA rank), one per domain (test size), and
    totals."""
    width = max([len("domain"), *(len(name) for name in fd.domains), *(len(c.domain) for c in fd.clients)])
    lines = [f"{'client':>6}  {'domain':<{width}}  {'samples':>8}  {'classes':>7}  {'rank':>4}"]
    for client in fd.clients:
        present = sum(count > 0 for count in client.class_counts)
        lines.append(f"{client.id:>6}  {client.domain:<{width}}  {client.num_samples:>8}  {present:>7}  "
                     f"{ranks[client.id]:>4}")
    total_train = sum(client.num_samples for client in fd.clients)
    present = sum(any(client.class_counts[label] for client in fd.clients) for label in range(fd.num_classes))
    lines.append(f"{'total':>6}  {'':<{width}}  {total_train:>8}  {present:>7}")
    lines += ["", f"{'domain':<{width}}  {'test':>8}"]
    lines += [f"{name:<{width}}  {len(dataset):>8}" for name, dataset in fd.test.items()]
    lines.append(f"{'total':<{width}}  {sum(len(dataset) for dataset in fd.test.values()):>8}")
    return "\n".join(lines)


def plot_class_counts(fd: FederatedData, path: Path) -> None:
    """A client x class heatmap of training sample counts, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [client.class_counts for client in fd.clients]
    figure, axes = plt.subplots(figsize=(min(4 + 0.12 * fd.num_classes, 24), min(2 + 0.3 * len(counts), 16)))
    image = axes.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xlabel("class")
    axes.set_ylabel("client")
    axes.set_yticks(range(len(counts)), [f"{c.id} {c.domain}" for c in fd.clients], fontsize=7)
    figure.colorbar(image, ax=axes, label="training samples")
    axes.set_title(f"{len(counts)} clients, {fd.num_classes} classes")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summarize(cfg: FitConfig, plot: Path | None = None, build_cache: bool = False) -> None:
    """Print the partition `lorafair fit` would use with this config; optionally write the class-count heatmap
    and build (or check) the image cache of every split."""
    fd = build_data(cfg)
    if not cfg.is_language_model:
        size = "x".join(str(s) for s in model_data_config(cfg.model, cfg.data.image_size)["input_size"][1:])
        shape = f"images {size}"
    else:
        shape = f"text of at most {cfg.text.max_length} tokens"
    print(f"{cfg.data.name}: {len(fd.domains)} domains, {fd.num_classes} classes, {len(fd.clients)} clients "
          f"({cfg.federation.partition} partition, seed {cfg.seed}), {shape}")
    print(summary_table(fd, cfg.lora.rank_of([(c.id, c.domain) for c in fd.clients], fd.domains)))
    if plot is not None:
        plot_class_counts(fd, plot)
        print(f"heatmap written to {plot}")
    if build_cache:
        print(build_caches(fd, cfg.data))
