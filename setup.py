from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="dfine",
    version="0.1.0",
    description="Training framework for real-time DETR detectors: D-FINE and RT-DETRv2",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["dfine", "dfine.*"]),
    install_requires=requirements,
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2"],
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
        "hf": ["transformers>=4.48", "safetensors>=0.4"],
        "loggers": ["wandb>=0.19", "mlflow-skinny>=2.20"],
    },
    entry_points={"console_scripts": ["dfine=dfine.cli.__main__:main"]},
    license="Apache-2.0",
)
