"""competesmoe: pre-training Mixture-of-Experts language models with CompeteSMoE routing."""
from setuptools import find_packages, setup

# The Triton kernels live in the top-level kernels/ folder and are installed as competesmoe.kernels.
setup(
    name="competesmoe",
    version="0.1.0",
    description="Pre-training Mixture-of-Experts LMs with CompeteSMoE routing",
    python_requires=">=3.10",
    packages=find_packages(include=["competesmoe", "competesmoe.*"]) + ["competesmoe.kernels"],
    package_dir={"competesmoe.kernels": "kernels"},
    include_package_data=True,
    install_requires=[
        "torch==2.13.0",
        "triton==3.7.1",
        # deepspeed builds no C++ ops at install when DS_BUILD_OPS=0 (the Makefile sets it).
        "deepspeed==0.19.8",
        "omegaconf==2.4.0",
        "sentencepiece>=0.2,<0.3",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "wandb>=0.17",
    ],
    extras_require={
        # transformers and lm-eval (with accelerate, which its `hf` model needs) test the Hugging
        # Face export: loading it, generate(), and an lm-eval round trip. The exported modeling
        # code follows transformers 5's generation API (tested with 5.24). psutil:
        # tools/scale_benchmark.py samples the memory of a process tree. ruff: the lint (ruff.toml).
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=5.24,<6", "lm-eval>=0.4.13,<0.5",
                "accelerate>=1.0", "psutil>=5.9", "ruff>=0.8"],
        "hf": ["transformers>=5.24,<6"],
        "lmeval": ["lm-eval>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "competesmoe-train=competesmoe.train.cli:main",
            "competesmoe-data=competesmoe.data.cli:main",
            "competesmoe-ckpt=competesmoe.export.ckpt_cli:main",
            "competesmoe-launch=competesmoe.launcher.cli:main",
            "competesmoe-profile=competesmoe.profiling.kernels:main",
            "competesmoe-eval=competesmoe.eval.cli:main",
            "competesmoe-plot=competesmoe.eval.plots:main",
            "competesmoe-generate=competesmoe.eval.generate_cli:main",
        ],
    },
)
