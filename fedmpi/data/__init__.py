"""Training and test data, and how it is split over clients.

Owns the datasets (`datasets.py`: Fashion-MNIST / MNIST IDX files, CIFAR-10, torchvision's
folders and downloaders, each client's part), the HDF5 client shards (`shards.py`) and the
splits (`partition.py`: IID, Dirichlet label skew, quantity skew, shards, and the
reference's numpy-legacy draws). A client loads only its own part; the federator only the
test set.

May import: fedmpi.config, fedmpi.errors.
"""

from fedmpi.data.datasets import (
    IDX_FILES,
    INFO,
    client_sizes,
    compute_split,
    dataset_info,
    find_root,
    load_arrays,
    load_client_data,
    load_clients_data,
    load_test_data,
    read_idx,
    to_float,
    write_idx,
)
from fedmpi.data.shards import read_shard, read_test, shards_info, write_shards
from fedmpi.errors import DataError

__all__ = [
    "DataError",
    "IDX_FILES",
    "INFO",
    "compute_split",
    "dataset_info",
    "find_root",
    "client_sizes",
    "load_arrays",
    "load_client_data",
    "load_clients_data",
    "load_test_data",
    "read_idx",
    "read_shard",
    "read_test",
    "shards_info",
    "to_float",
    "write_idx",
    "write_shards",
]
