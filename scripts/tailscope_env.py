"""Run tailscope's Python scripts under the project's Python.

The scripts need packages that scripts/setup installs into its virtualenv (torch, transformers,
selenium, ...), not into the system's python3 their `#!/usr/bin/env python3` line finds. Each
script calls `need(...)` before importing them: under a Python that lacks one, the script runs
itself again under the project's Python ($TAILSCOPE_PYTHON, else the virtualenv at
$TAILSCOPE_TORCH_HOME or ~/.cache/tailscope/torch-2.11.0), or, where that has none either,
stops with one line saying how to install them (exit 1).
"""
import importlib.util
import os
import sys


def project_python():
    """The Python scripts/setup provisions: $TAILSCOPE_PYTHON, else its virtualenv's."""
    home = os.environ.get("TAILSCOPE_TORCH_HOME",
                          os.path.expanduser("~/.cache/tailscope/torch-2.11.0"))
    for py in [os.environ.get("TAILSCOPE_PYTHON"), os.path.join(home, "bin", "python")]:
        if py and os.path.isfile(py) and os.access(py, os.X_OK):
            return py
    return None


def need(script, modules, setup="scripts/setup --test-deps"):
    """Return when every module of `modules` can be imported here; otherwise run `script`
    (its path) again under the project's Python, or exit 1 with a line naming `setup`."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    # Paths, not their targets: a virtualenv's python links to the interpreter it was made from,
    # whose own packages are not the virtualenv's.
    py = project_python()
    other = py is not None and os.path.abspath(py) != os.path.abspath(sys.executable)
    if other and not os.environ.get("TAILSCOPE_REEXEC"):
        os.environ["TAILSCOPE_REEXEC"] = "1"
        os.execv(py, [py, os.path.abspath(script)] + sys.argv[1:])
    name = os.path.basename(script)
    print(f"{name}: {', '.join(missing)} not installed for {sys.executable}"
          f"{f' nor for {py}' if other else ''}; run {setup}, which installs "
          "it into the project's Python (this script then runs itself under it)",
          file=sys.stderr)
    sys.exit(1)
