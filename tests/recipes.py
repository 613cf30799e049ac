"""Running the recipes from the tests: `accelerate launch` on CPU (1 or 2 processes), their results, and the recipe
files imported as modules.

Multi-process note: with accelerate 1.x, `accelerate launch --cpu --num_processes 2` starts ONE process unless
mpirun is configured (huggingface/accelerate#2741); two CPU processes over gloo are started with
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` (torch.distributed.run).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
TESTS = REPO / "tests"
DATA_DIR = Path(os.environ.get("INHERNET_DATA_DIR", REPO.parent / "shared" / "data"))


def launch(recipe: str, args, output_dir, num_processes=1, env=None, check=True, timeout=300, mixed_precision="no"):
    """`accelerate launch recipes/<recipe>.py ARGS --output_dir OUTPUT_DIR` on CPU; returns the CompletedProcess."""
    return launch_script(RECIPES / f"{recipe}.py", [*args, "--output_dir", output_dir], num_processes, env, check,
                         timeout, mixed_precision)


def launch_script(script, args, num_processes=1, env=None, check=True, timeout=300, mixed_precision="no"):
    """`accelerate launch SCRIPT ARGS` on CPU (1 process, or N over gloo); returns the CompletedProcess."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--mixed_precision", mixed_precision,
               "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "--num_processes", str(num_processes)]
    extra = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if num_processes == 1:
        command.append("--cpu")
    else:
        command += ["--multi_gpu", "--main_process_port", "0"]
        extra["ACCELERATE_USE_CPU"] = "1"
    command += [str(script), *map(str, args)]
    result = subprocess.run(command, env={**os.environ, **extra, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def results(output_dir) -> dict:
    return json.loads((Path(output_dir) / "all_results.json").read_text())


def load_recipe(recipe: str):
    """recipes/<recipe>.py as a module (registered in sys.modules: its dataclasses need it). recipes/ goes on
    sys.path, as when a recipe runs as a script, for the recipes that import each other."""
    if str(RECIPES) not in sys.path:
        sys.path.append(str(RECIPES))
    name = f"{recipe}_recipe"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RECIPES / f"{recipe}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
