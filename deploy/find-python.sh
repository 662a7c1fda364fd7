#!/usr/bin/env bash
# Print the path of a Python of the given minor version (deploy/find-python.sh 3.12): python3.12 on
# PATH when it runs (a pyenv shim of a version that is not selected does not), else pyenv's install
# of it, else /usr/local/bin or /usr/bin. Exits 1 with one line when there is none.
v=${1:?usage: find-python.sh 3.12}
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for p in "python$v" "$root"/versions/"$v".*/bin/"python$v" /usr/local/bin/"python$v" /usr/bin/"python$v"; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import venv, ensurepip' 2>/dev/null; then
        command -v "$p"
        exit 0
    fi
done
echo "no python$v with venv found: install Python $v, or give PYTHON=/path/to/python$v" >&2
exit 1
