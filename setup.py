from setuptools import find_packages, setup

setup(
    name="phantom_plugin",
    version="0.1.0",
    description="Phantom parallelism (arXiv 2508.00960) for PyTorch, Megatron-core and DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["phantom_plugin", "phantom_plugin.*", "integrations", "integrations.*"]),
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "megatron": ["megatron-core>=0.16", "psutil"],
        "deepspeed": ["deepspeed>=0.16", "pydantic>=2"],
        "energy": ["nvidia-ml-py"],
        "bench": ["matplotlib"],
        "test": ["pytest>=7", "matplotlib"],
        "dev": ["pytest>=7", "matplotlib", "ruff"],
    },
    entry_points={"console_scripts": [
        "phantom-plan=phantom_plugin.plan:main",
        "phantom-bench=phantom_plugin.bench.cli:main",
    ]},
)
