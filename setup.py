import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

# The import hook (phantom_plugin.integrations.deepspeed_autoload.py, a top-level module that imports no torch) is
# activated at interpreter start by a .pth file at the root of site-packages. setuptools has no
# option for that: the commands below put the file at the root of the wheel (`pip install .`),
# of the editable wheel (`pip install -e .`) and of a legacy `setup.py develop` install.
PTH = "phantom_plugin_autoload.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, *args, **kwargs):
        return super().get_outputs(*args, **kwargs) + [os.path.join(self.build_lib, PTH)]


class DevelopWithPth(develop):
    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.install_dir, PTH))


CMDCLASS = {"build_py": BuildPyWithPth, "develop": DevelopWithPth}
try:
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            out = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            self.copy_file(os.path.join(HERE, PTH), os.path.join(unpacked_wheel, PTH))
            return out

    CMDCLASS["editable_wheel"] = EditableWheelWithPth
except ImportError:          # setuptools < 64: `pip install -e .` runs `develop`
    pass

# Each extra lists what the code it serves imports (torch>=2.4 stays the only torch requirement):
MEGATRON = ["megatron-core>=0.16", "psutil"]    # phantom_plugin.megatron; psutil: megatron's checkpoint saver
DEEPSPEED = ["deepspeed>=0.16", "pydantic>=2"]  # phantom_plugin.deepspeed (its config section is a pydantic model)
HF = ["transformers>=4.46", "accelerate>=1.0"]  # DeepSpeed through the Hugging Face Trainer / accelerate

setup(
    name="phantom_plugin",
    version="0.1.0",
    description="Phantom parallelism (arXiv 2508.00960) for PyTorch, Megatron-core and DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # integrations/ (entry points other people's programs load) stays at the repository's top level
    # and installs as phantom_plugin.integrations.
    packages=find_packages(include=["phantom_plugin", "phantom_plugin.*"])
    + ["phantom_plugin.integrations", "phantom_plugin.integrations.megatron_lm"],
    package_dir={"phantom_plugin.integrations": "integrations"},
    cmdclass=CMDCLASS,
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "megatron": MEGATRON,
        "deepspeed": DEEPSPEED,
        "hf": DEEPSPEED + HF,
        "energy": ["nvidia-ml-py"],                   # EnergyMeter's NVML source (module pynvml)
        # phantom-bench and phantom-plan --calibrate always build megatron-core's TP baseline; plots
        "bench": MEGATRON + ["matplotlib"],
        # the test tools; the suite also needs the extras of what it tests (`make test` installs
        # megatron, deepspeed, energy, test and docs; its Python 3.12 leg megatron, deepspeed,
        # hf, energy and test, at their newest releases)
        "test": ["pytest>=7", "ruff", "matplotlib"] + HF,
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    entry_points={"console_scripts": [
        "phantom-plan=phantom_plugin.cli.plan:main",
        "phantom-bench=phantom_plugin.cli.bench:main",
    ]},
)
