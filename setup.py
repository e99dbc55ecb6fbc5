"""zoscale: zeroth-order fine-tuning optimizers that run on sharded parameters."""
from setuptools import find_packages, setup

setup(
    name="zoscale",
    version="0.1.0",
    description="Zeroth-order (MeZO-family) LLM fine-tuning on DeepSpeed ZeRO-3 and FSDP2 shards",
    packages=find_packages(include=["zoscale", "zoscale.*"]),
    python_requires=">=3.10",
    # torch is pinned by launch/setup.sh before this is installed (a CPU wheel on these
    # machines); an unpinned torch here would let pip pull a multi-GB CUDA build.
    install_requires=[
        "torch>=2.6",  # named parameters in optimizer param groups
        "transformers>=4.46",
        "datasets>=3.0",
        "accelerate>=1.0",
        "deepspeed>=0.16",
        "peft>=0.13",
        "gguf>=0.10",  # loads the bundled SmolLM2 GGUF weights
        "tqdm",
        "numpy",
        # Plots of a run's metrics.jsonl (launch/plot.py) and TensorBoard event files
        # (report_to=tensorboard, through torch.utils.tensorboard): kept libraries, not our own.
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
    entry_points={"console_scripts": ["zoscale = zoscale.plan_cli:console"]},  # zoscale plan
    # trl: zoscale.hf.sft.ZOSFTTrainer (trl's SFTTrainer with a ZO step); tested with trl 1.16.
    # The test extra includes it so that the README's test command (setup.sh installs .[test])
    # runs the SFT tests on a fresh machine instead of skipping them.
    extras_require={"test": ["pytest>=8", "scipy>=1.10", "trl>=1.16"], "trl": ["trl>=1.16"]},
)
