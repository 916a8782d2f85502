"""Tasks, readers, splits and the synthetic task; tokenization lives in data/tokenize.py."""

from scaling_fl.data.dataset import DataError, TextDataset
from scaling_fl.data.splits import SPLIT_METHODS, label_histograms, split_indices
from scaling_fl.data.synthetic import SYNTHETIC_LABELS, make_synthetic, synthetic_task
from scaling_fl.data.tasks import TASK_NAMES, check_task_options, load_task

__all__ = [
    "DataError",
    "TextDataset",
    "TASK_NAMES",
    "load_task",
    "check_task_options",
    "SPLIT_METHODS",
    "split_indices",
    "label_histograms",
    "SYNTHETIC_LABELS",
    "make_synthetic",
    "synthetic_task",
]
