"""Datasets, partitions and client packing."""

from .loaders import DATASETS, Dataset, DatasetMeta, dataset_meta, load_dataset
from .packing import PackedClients, pack_clients
from .partition import partition, partition_stats, stratified_holdout

__all__ = [
    "DATASETS", "Dataset", "DatasetMeta", "dataset_meta", "load_dataset",
    "PackedClients", "pack_clients", "partition", "partition_stats", "stratified_holdout",
]
