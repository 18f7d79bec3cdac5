from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("edgetrain/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)  # a single literal assignment

ONNX = ["onnx>=1.15,<1.19; python_version < '3.11'", "onnx>=1.15; python_version >= '3.11'"]

setup(
    name="edgetrain",
    version=version["__version__"],
    description="Module-wise (TRGL) training for memory-constrained devices",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    # devices/ (the repository's profiles) is installed inside the package as edgetrain/devices/
    # and recipes/ (`--config NAME`) as edgetrain/recipes/
    packages=find_packages(include=["edgetrain", "edgetrain.*"]) + ["edgetrain.devices",
                                                                     "edgetrain.recipes"],
    package_dir={"edgetrain.devices": "devices", "edgetrain.recipes": "recipes"},
    package_data={"edgetrain.devices": ["*.toml", "README.md"], "edgetrain.recipes": ["*.toml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1,<2.15",
        "torchvision>=0.16,<0.30",
        "numpy>=1.23",
        "safetensors>=0.4",
        "click>=8.1",
        "psutil>=5.9",
        "tqdm>=4.64",
        "Pillow>=9.1",  # image folders: decoding (Image.draft, Resampling) for packs and predict
        "scikit-learn>=1.2",
        "tomli>=2.0; python_version < '3.11'",
    ],
    extras_require={
        # onnxruntime 1.23 (the last for Python 3.10) loads IR <= 11: onnx 1.19+ writes IR 12+ in
        # ORT's own quantisation pre-processing, so int8 export there needs onnx < 1.19
        "export": [*ONNX, "onnxscript>=0.7", "onnxruntime>=1.17"],
        # predict MODEL.onnx on a device without PyTorch: onnxruntime next to numpy, Pillow,
        # click (docs/deploy.md: `pip install onnxruntime numpy Pillow click` then
        # `pip install --no-deps edgetrain`)
        "predict": ["onnxruntime>=1.17"],
        # export --format pte / predict MODEL.pte (ExecuTorch 1.5.1 runs beside torch 2.14.1)
        "executorch": ["executorch>=1.5.1,<1.6"],
        "plots": ["matplotlib>=3.7"],
        # research/: the paper reproduction and studies (scipy.stats.t for their intervals)
        "research": ["scipy>=1.9,<2", "matplotlib>=3.7"],
        # the manual: `mkdocs build --strict` (CLI reference by mkdocs-click, API by mkdocstrings)
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocs-click>=0.8",
                 "mkdocstrings[python]>=0.26"],
        "test": ["pytest>=7.4", "hypothesis>=6.0", *ONNX, "onnxscript>=0.7", "onnxruntime>=1.17", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["edgetrain=edgetrain.cli:main"]},
)
