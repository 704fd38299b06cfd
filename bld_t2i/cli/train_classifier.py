"""Train the small classifier that scores a class-conditional model's samples.

    python -m bld_t2i.cli.train_classifier --shards 'fmnist/shard-{000000..000003}.tar' \\
        --heldout fmnist/shard-000012.tar --out runs/fmnist/classifier [--epochs 5] [--flip]
        [--autoencoder AE/export [--reconstructions 0.5]]
    python -m bld_t2i.cli.evaluate ... --classifier runs/fmnist/classifier

The label is each sample's `.json` "label". Without --heldout, 1 in `classifier.heldout_every`
of the images is held out. The accuracy on the held-out real images is printed and saved in
<out>/config.json; the evaluation prints it beside its samples' accuracy. With --autoencoder
it is also measured on the held-out images' reconstructions (what a latent model's samples
look like at best), and --reconstructions p trains on a reconstruction with probability p. Every flag
sets a field of the `classifier` config section (`--recipe R`, `classifier.key=value`, `--dry-run`).
"""

from __future__ import annotations

from bld_t2i.config import Flag, entry_config
from bld_t2i.eval.classifier_training import train_classifier

FLAGS = [Flag("--shards", "classifier.shards", "labelled image shards"),
         Flag("--heldout", "classifier.heldout", "held-out image shards"),
         Flag("--heldout-every", "classifier.heldout_every"), Flag("--heldout-limit", "classifier.heldout_limit"),
         Flag("--out", "classifier.out", "classifier folder"), Flag("--resolution", "classifier.resolution"),
         Flag("--limit", "classifier.limit"), Flag("--epochs", "classifier.epochs"),
         Flag("--batch-size", "classifier.batch_size"), Flag("--lr", "classifier.lr"), Flag("--width", "classifier.width"),
         Flag("--flip", "classifier.flip"), Flag("--seed", "classifier.seed"), Flag("--device", "classifier.device"),
         Flag("--autoencoder", "classifier.autoencoder", "exported autoencoder: also measure on its reconstructions"),
         Flag("--reconstructions", "classifier.reconstructions", "probability of training on a reconstruction")]


def main(argv=None) -> None:
    cfg = entry_config(__doc__.split("\n")[0], ("classifier",), FLAGS, argv,
                       required=("classifier.shards", "classifier.out"))
    if cfg is None:
        return
    config = train_classifier(cfg.classifier)
    held = config["heldout"]
    recon = f", {held['reconstructed_accuracy']:.4f} on their reconstructions" if "reconstructed_accuracy" in held else ""
    print(f"[train_classifier] held-out accuracy {held['accuracy']:.4f} on {held['images']} real images "
          f"({held['shards']}){recon}; trained on {config['train_images']} in {config['train_s']:.0f} s "
          f"-> {cfg.classifier.out}")


if __name__ == "__main__":
    main()
