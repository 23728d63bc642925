"""`lorafair data`: the summary of a config's datasets and partition, its plots and previews."""

from __future__ import annotations

from PIL import Image

from lorafair.cli import main
from lorafair.config import DataConfig, FederationConfig, FitConfig
from lorafair.data.digits import DOMAINS, save_preview
from lorafair.data.summary import summarize
from tests.helpers import DIGITS_VIT


def test_summarize_prints_clients_and_domains_and_plots(tmp_path, capsys):
    cfg = FitConfig(model=DIGITS_VIT, data=DataConfig(name="digits"),
                    federation=FederationConfig(partition="feature_label", clients_per_domain=3))
    summarize(cfg, plot=tmp_path / "plots" / "counts.png")
    out = capsys.readouterr().out
    assert "digits: 6 domains, 10 classes, 18 clients (feature_label partition, seed 0), images 32x32" in out
    client_rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [row[1] for row in client_rows] == [d for d in DOMAINS for _ in range(3)]
    assert sum(int(row[2]) for row in client_rows) == 1540 - 6 * round(0.2 * 1540 / 6)
    with Image.open(tmp_path / "plots" / "counts.png") as png:
        assert png.format == "PNG" and png.width > 200


def test_cli_data_command(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text("model:\n  name: vit_base_patch16_224\n  kwargs: {depth: 1, embed_dim: 32, num_heads: 2, "
                      "img_size: 32}\ndata:\n  name: digits\nfederation:\n  partition: iid\n  num_clients: 4\n")
    assert main(["data", "--config", str(config), "--data.image_size", "16"]) == 0
    out = capsys.readouterr().out
    assert "4 clients (iid partition, seed 0), images 16x16" in out and out.count(" mixed ") == 4

    missing = tmp_path / "no_domainnet_here"
    assert main(["data", "--config", str(config), "--data.name", "domainnet", "--data.root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorafair: error: data.root {missing} does not exist")
    assert "clipart/aircraft_carrier/clipart_001_000001.jpg 0" in err and len(err.strip().splitlines()) == 1


def test_preview_png(tmp_path):
    save_preview(tmp_path / "digits.png", image_size=16, per_domain=4)
    with Image.open(tmp_path / "digits.png") as png:
        assert png.size == (4 * 18 + 2, 6 * 18 + 2)
