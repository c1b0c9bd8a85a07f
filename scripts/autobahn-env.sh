#!/usr/bin/env bash
# Creates (once) a Python 2.7 virtualenv holding the Autobahn|Testsuite and prints the path of its `wstest`.
# The testsuite's last release is Python 2 only; virtualenv<20.22 is the last line able to make 2.7 envs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
venv_dir=${AUTOBAHN_VENV:-$root/target/autobahn-venv}
wstest=$venv_dir/py27/bin/wstest
if [ -x "$wstest" ]; then echo "$wstest"; exit 0; fi

py27=${PYTHON27:-}
if [ -z "$py27" ] && command -v pyenv >/dev/null 2>&1; then
  py27="$(pyenv root)/versions/2.7.18/bin/python"
fi
if [ -z "$py27" ] || [ ! -x "$py27" ]; then
  py27=$(command -v python2.7 || true)
fi
if [ -z "$py27" ] || [ ! -x "$py27" ]; then
  echo "autobahn-env: Python 2.7 not found (looked at \$PYTHON27, \$(pyenv root)/versions/2.7.18, python2.7 on PATH)." >&2
  echo "autobahn-env: the Autobahn|Testsuite runs only on Python 2.7; install it (e.g. 'pyenv install 2.7.18') and retry." >&2
  exit 3
fi

mkdir -p "$venv_dir"
python3 -m venv "$venv_dir/tools" >&2
"$venv_dir/tools/bin/pip" install --quiet 'virtualenv<20.22' >&2
"$venv_dir/tools/bin/virtualenv" --quiet -p "$py27" "$venv_dir/py27" >&2
"$venv_dir/py27/bin/pip" install --quiet 'autobahntestsuite==25.10.1' >&2
echo "$wstest"
