#!/bin/bash
# Dataproc initialization action (every node, at creation): the OS packages the jobs need.
# The packed environment's bin/python links to /opt/conda/default/bin/python3.11 (Dataproc 2.2
# images); this checks it is there, so a wrong image version fails at creation, not mid-pipeline.
set -euo pipefail
/opt/conda/default/bin/python3.11 --version
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version --format=csv
  major=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
  if [ "$major" -lt 580 ]; then
    echo "NVIDIA driver $major < 580: torch 2.14's CUDA 13 wheels will not see the GPU" >&2
    exit 1
  fi
fi
