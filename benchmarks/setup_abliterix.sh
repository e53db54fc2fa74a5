#!/usr/bin/env bash
# Install abliterix 1.12.2 (AGPL-3.0) into a virtual environment of the benchmark's own, under
# benchmarks/_work/ (git-ignored). abliterix is only ever run as an external program by
# bench_directions.py: never imported by ablate, never a dependency, none of its code copied.
#
# As for heretic, the venv sees the project venv's packages (torch among them) through a .pth file
# placed *after* its own site-packages, so abliterix's `torch` requirement is met by the project's
# CPU build and no multi-GB CUDA wheel is downloaded; abliterix's own pins (transformers, datasets,
# optuna, ...) are installed into the benchmark venv and take precedence there. The project venv is
# never modified. On a GPU machine whose project venv has a CUDA torch, the same script gives a GPU run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
project_python="${PROJECT_PYTHON:-$(command -v python)}"
venv="${ABLITERIX_VENV:-$here/_work/abliterix-venv}"
base_python="$("$project_python" -c 'import sys; print(sys._base_executable)')"
project_site="$("$project_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$base_python" -m venv "$venv"
own_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$project_site" > "$own_site/zz-project-venv.pth"
"$venv/bin/pip" install --quiet "abliterix==1.12.2"
"$venv/bin/abliterix" --help > /dev/null && echo "abliterix installed: $venv/bin/abliterix"
