"""Data for zoscale: sources and data set formats, the tasks that turn records into batches, splits."""

from zoscale.data.sources import (
    data_dir,
    default_data_archive,
    load_rotten_tomatoes,
    load_tweets,
    split_train_eval,
)

__all__ = [
    "data_dir",
    "default_data_archive",
    "load_rotten_tomatoes",
    "load_tweets",
    "split_train_eval",
]
