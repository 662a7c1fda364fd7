#!/bin/bash
# Dataproc initialization action (every node, at creation): the OS packages the jobs need.
# The packed environment's bin/python links to /opt/conda/default/bin/python3.X, X from the
# cluster's metadata instalearn-python (submit.py sets it from the settings: 3.12 on image 3.0,
# 3.11 on 2.2/2.3); this checks it is there, so a wrong image version fails at creation, not
# mid-pipeline.
set -euo pipefail
py=$(/usr/share/google/get_metadata_value attributes/instalearn-python 2>/dev/null || echo 3.12)
"/opt/conda/default/bin/python$py" --version
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version --format=csv
  major=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
  if [ "$major" -lt 580 ]; then
    echo "NVIDIA driver $major < 580: torch 2.14's CUDA 13 wheels will not see the GPU" >&2
    exit 1
  fi
fi
