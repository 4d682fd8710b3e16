#!/usr/bin/env bash
# A head and two worker Ray nodes on this machine (see srmoa_dist/runtime/local_cluster.py).
#   scripts/cluster.sh up [--workers 2 --shards 4 --base-port 26000 --root /tmp/srmoa-cluster]
#   scripts/cluster.sh status | down | kill-node N | restart-node N | mount --data-dir DIR
# Every node is stopped by the process ids this started (never `ray stop`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${SRMOA_PYTHON:-$here/.venv/bin/python}"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
[ $# -ge 1 ] || { echo "usage: $0 up|down|status|kill-node N|restart-node N|mount --data-dir DIR [options]" >&2; exit 2; }
exec "$py" -m srmoa_dist.cli cluster "$@"
