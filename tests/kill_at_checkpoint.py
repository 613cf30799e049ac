"""Run a recipe script and exit abruptly (as a kill would) just before checkpoint NAME is renamed into place:

    accelerate launch tests/kill_at_checkpoint.py step_8 recipes/glue.py ARGS...

The fault is injected here, in the test, by wrapping `os.replace` for the one rename of `.tmp-NAME` -> `NAME` that
`inhernet_hf.checkpoints.save_checkpoint` does after its temporary folder is complete; the library has no test hook.
"""

import os
import runpy
import sys
from pathlib import Path

from inhernet_hf.checkpoints import TMP_PREFIX

name, script, *recipe_args = sys.argv[1:]
real_replace = os.replace


def replace_or_die(src, dst, *args, **kwargs):
    if Path(src).name == f"{TMP_PREFIX}{name}" and Path(dst).name == name:
        os._exit(86)
    return real_replace(src, dst, *args, **kwargs)


os.replace = replace_or_die
sys.argv = [script, *recipe_args]
sys.path.insert(0, str(Path(script).resolve().parent))  # as when the recipe runs as a script
runpy.run_path(script, run_name="__main__")
