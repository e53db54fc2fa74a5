#!/usr/bin/env bash
# Install heretic-llm 1.4.0 (AGPL-3.0) into a virtual environment of the benchmark's own, under
# benchmarks/_work/ (git-ignored). heretic is only ever run as an external program by
# bench_directions.py: never imported by ablate, never a dependency, none of its code copied.
#
# To avoid a second multi-GB torch download, the venv sees the project venv's packages through a
# .pth file placed *after* its own site-packages; heretic's own pins (e.g. datasets 4.x) are installed
# into the benchmark venv and take precedence there. The project venv is never modified.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
project_python="${PROJECT_PYTHON:-$(command -v python)}"
venv="$here/_work/heretic-venv"
base_python="$("$project_python" -c 'import sys; print(sys._base_executable)')"
project_site="$("$project_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$base_python" -m venv "$venv"
own_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$project_site" > "$own_site/zz-project-venv.pth"
"$venv/bin/pip" install --quiet "heretic-llm==1.4.0"
"$venv/bin/heretic" --help > /dev/null && echo "heretic installed: $venv/bin/heretic"
