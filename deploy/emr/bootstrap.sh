#!/bin/bash
# EMR bootstrap action (every node, before Spark starts): the OS packages the jobs need.
# - python3.X (the argument, the settings' `python`: 3.12 on EMR 8, 3.11 on EMR 7): the packed
#   environment's bin/python links to /usr/bin/python3.X (Amazon Linux 2023's system Python is
#   3.9; torch 2.14 needs >= 3.10).
# - GPU nodes: torch 2.14's CUDA 13 wheels need NVIDIA driver >= 580; older drivers are replaced
#   from NVIDIA's Amazon Linux 2023 repository. YARN's GPU plugin also needs the cgroup devices
#   hierarchy writable.
set -euo pipefail
py=${1:-3.12}
sudo dnf install -y -q "python$py"
"/usr/bin/python$py" --version

if lspci 2>/dev/null | grep -qi nvidia; then
  have=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 | cut -d. -f1 || echo 0)
  if [ "${have:-0}" -lt 580 ]; then
    sudo dnf config-manager --add-repo \
      https://developer.download.nvidia.com/compute/cuda/repos/amzn2023/x86_64/cuda-amzn2023.repo
    sudo dnf module install -y -q nvidia-driver:580-open
  fi
  nvidia-smi --query-gpu=name,driver_version --format=csv
  sudo chmod a+rwx -R /sys/fs/cgroup/devices 2>/dev/null || true
fi
