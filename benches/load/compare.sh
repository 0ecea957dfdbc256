#!/bin/sh
# Wrapper: runs compare.py (Python 3 standard library only) with the same arguments.
# See README.md beside this file.
exec python3 "$(dirname "$0")/compare.py" "$@"
