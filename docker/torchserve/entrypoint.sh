#!/bin/sh
# Entry point of the torchserve image: weights into the volume, one .mar per model, the config, then TorchServe.
#   GNWS_TORCHSERVE_MODELS  space-separated zoo keys / model-store names (default: the two R-50 defaults)
#   GNWS_TS_BATCH_SIZE, GNWS_TS_MAX_BATCH_DELAY_MS, GNWS_TS_WORKERS  batching and workers per model
#   GNWS_OFFLINE=1          never download (see docs/containers.md)
#   TS_BIND_ADDRESS         interface address for inference and metrics (default: the container's own address)
# An archive is rebuilt when its model-store file is newer (e.g. after a training export). TorchServe serves
# exactly these models: the rendered config names them, so other archives in the model store are ignored.
set -eu
models="${GNWS_TORCHSERVE_MODELS:-faster_rcnn_r50_fpn_gn_ws-all_1x_coco mask_rcnn_r50_fpn_gn_ws-all_2x_coco}"
mar_store="${GNWS_MAR_STORE:-/home/model-server/model-store}"
ts_dir=$(dirname "$0")  # render_config.py and the health check live beside this script
effective="${GNWS_TS_EFFECTIVE_CONFIG:-/home/model-server/effective-config.properties}"
mkdir -p "$mar_store" "${TEMP:-/tmp}"
# shellcheck disable=SC2086  # word splitting of the model list is intended
python /opt/gnws/prepare_models.py $models
for name in $models; do
    mar="$mar_store/$name.mar"
    src="${GNWS_MODEL_STORE:-/var/lib/gnws/models}/$name.safetensors"
    if [ ! -f "$mar" ] || { [ -f "$src" ] && [ "$src" -nt "$mar" ]; }; then
        gnws archive "$name" --export-path "$mar_store" --force \
            --batch-size "${GNWS_TS_BATCH_SIZE:-4}" --max-batch-delay "${GNWS_TS_MAX_BATCH_DELAY_MS:-50}" \
            --workers "${GNWS_TS_WORKERS:-1}"
    fi
done
# shellcheck disable=SC2086
python "$ts_dir/render_config.py" --template "${TS_CONFIG_FILE:-/home/model-server/config.properties}" \
    --model-store "$mar_store" --out "$effective" $models
# TorchServe reads the config named by TS_CONFIG_FILE and ignores --ts-config when that is set (the image sets it
# to the shipped template), so point it at the rendered config too.
export TS_CONFIG_FILE="$effective"
exec torchserve --start --foreground --ncs --ts-config "$effective" --model-store "$mar_store"
