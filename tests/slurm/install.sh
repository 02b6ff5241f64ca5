#!/usr/bin/env bash
# Install Debian's Slurm (controller, node daemon, client) and munge, if missing.
# Idempotent and quiet: does nothing when everything is installed already.
#   sudo tests/slurm/install.sh        (CI: .ci/run calls it on a fresh machine)
set -euo pipefail

pkgs=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "tests/slurm/install.sh: installing ${missing[*]} needs root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The packages' own services are not started (no systemd here); tests/slurm/cluster.sh runs them.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "tests/slurm/install.sh: installed ${missing[*]}"
