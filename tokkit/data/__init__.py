"""Image data: sources (folder, zip, list, arrays, webdataset tars, parquet, MDS, hf:, the sample set), robust decoding,
pinned preprocessing.

    from torch.utils.data import DataLoader
    from tokkit.data import open_source, ImageDataset, collate_skip_bad, to_float
    src = open_source("photos/")                      # or a .zip, a .txt list, a .npy/.npz, or "sample"
    src = open_source("shards/data-{000000..000127}.tar")   # webdataset tars (a glob works too)
    src = open_source("hf/train/", image_key="image", label_key="label")   # a folder of .parquet files
    src = open_source("s3://bucket/data-{000000..000127}.tar")               # tars at any fsspec URL
    src = open_source("mds/", split="train")                                  # an MDS folder (index.json)
    src = open_source("hf:ORG/NAME", split="train", image_key="image")        # a Hugging Face dataset
    ds = ImageDataset(src, resolution=64)             # item -> dict(image uint8 (3, 64, 64), label, index)
    loader = DataLoader(ds, batch_size=32, num_workers=2, collate_fn=collate_skip_bad)
    x = to_float(next(iter(loader))["images"])        # (B, 3, 64, 64) float in [-1, 1]
"""

from tokkit.data.datasets import ImageDataset, collate_skip_bad
from tokkit.data.images import BACKGROUND, MAX_PIXELS, BadImage, decode_image
from tokkit.data.inputs import MAX_INPUT_BYTES, MAX_INPUT_BYTES_ENV, max_input_bytes
from tokkit.data.sources import IMAGE_EXTENSIONS, ImageSource, open_source
from tokkit.data.transforms import (
    VIEWS,
    center_crop_resize,
    make_grid,
    make_views,
    random_crop_flip,
    to_float,
    to_uint8,
)
from tokkit.data.web_sources import TarSource, expand_braces, expand_shards

__all__ = [
    "make_grid",
    "BACKGROUND",
    "IMAGE_EXTENSIONS",
    "MAX_INPUT_BYTES",
    "MAX_INPUT_BYTES_ENV",
    "MAX_PIXELS",
    "VIEWS",
    "BadImage",
    "ImageDataset",
    "ImageSource",
    "TarSource",
    "center_crop_resize",
    "collate_skip_bad",
    "decode_image",
    "expand_braces",
    "expand_shards",
    "make_views",
    "max_input_bytes",
    "open_source",
    "random_crop_flip",
    "to_float",
    "to_uint8",
]
