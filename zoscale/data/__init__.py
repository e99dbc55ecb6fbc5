"""Data for zoscale: sentence sources and the prompt tasks that turn them into batches."""

from zoscale.data.sources import (
    data_dir,
    default_data_archive,
    load_labelled_file,
    load_rotten_tomatoes,
    split_train_eval,
)
from zoscale.data.tasks import SST2Task, evaluate_accuracy, label_logits, loss_fn

__all__ = [
    "SST2Task",
    "data_dir",
    "default_data_archive",
    "evaluate_accuracy",
    "label_logits",
    "load_labelled_file",
    "load_rotten_tomatoes",
    "loss_fn",
    "split_train_eval",
]
