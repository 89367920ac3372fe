#!/usr/bin/env bash
# Set up (scripts/setup.sh), fetch the two default models if they are not cached, and serve them
# on http://127.0.0.1:8000 (extra arguments go to `gnws serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/gnws fetch --bake faster_rcnn_r50_fpn_gn_ws-all_1x_coco mask_rcnn_r50_fpn_gn_ws-all_2x_coco
exec .venv/bin/gnws serve "$@"
