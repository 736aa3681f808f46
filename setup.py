"""flagopt: Meta's OPT language models one call away, exactly the reference's numbers."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "flagopt" / "version.py").read_text(), version)

setup(
    name="flagopt",
    version=version["__version__"],
    description="OPT language models (125m to 13b): download, load and generate, fast",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["flagopt", "flagopt.*", "model_zoo"]),
    package_data={"flagopt": ["data/opt-tokenizer/*"], "model_zoo": ["*.json"]},
    install_requires=[
        # >= 2.10: older releases have known bypasses of torch.load's safe unpickler.
        "torch>=2.10",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "requests>=2.28",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        # transformers is the reference implementation the tests compare against; the
        # library itself never imports it.
        # lm-eval[hf,api] is there so that tests/test_lm_eval.py compares with lm-eval's own hf
        # model and tests/test_lm_eval_serve.py drives flagopt serve with its
        # local-completions model in CI; it is heavy (~60 packages), so users get it only
        # with the eval extra.
        "test": ["pytest>=7", "transformers>=4.56", "fastapi>=0.110", "uvicorn>=0.29",
                 "openai>=1.30", "httpx>=0.27", "lm-eval[hf,api]>=0.4.13,<0.5",
                 "peft>=0.21"],
        # `flagopt serve`: the HTTP layer (flagopt.serve.app); the core install needs neither.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # `flagopt eval` and flagopt.eval.harness: its hf model's tokenization, as matched here.
        "eval": ["lm-eval>=0.4.13,<0.5"],
    },
    entry_points={
        "console_scripts": [
            "flagopt = flagopt.cli:main",
            "flagopt-download = flagopt.download:main",
        ],
    },
)
