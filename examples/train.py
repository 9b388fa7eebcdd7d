"""Train HarMA adapters (or LoRA / full fine-tuning) on a caption dataset of any format.

The annotation files may be in any format harma reads (docs/data.md): the RSITMD/RSICD layout,
Karpathy-style dataset_*.json (UCM-captions, Sydney-captions, the original RSICD release),
NWPU-Captions, open_clip CSV/TSV or a saved Hugging Face dataset. A file that holds several
splits is given for each split it serves; a recipe without a validation file can hold out a
fraction of the training images instead (--val_fraction, --val_seed):

    python examples/train.py --train_files data/ucm/dataset_ucm.json \
        --val_file data/ucm/dataset_ucm.json --test_file data/ucm/dataset_ucm.json \
        --image_root data/ucm/imgs --output_dir runs/ucm
    python examples/train.py --train_files train.csv --csv-img-key filepath --csv-caption-key title \
        --val_fraction 0.1 --test_file test.csv --image_root /data/images --output_dir runs/mine
    torchrun --nproc_per_node 2 examples/train.py --config my_recipe.json

Defaults are the reference recipe (docs/training.md); every field can be overridden as
--name value (see --help).
"""

from __future__ import annotations

from harma.training import main

if __name__ == "__main__":
    main(prog="train.py", description="Train on a caption dataset of any format (docs/data.md); defaults: the "
         "reference recipe.")
