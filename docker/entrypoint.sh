#!/bin/sh
# Entry point of the api image: fill the weights volume on first start, then run the command.
#   GNWS_OFFLINE=1     never download; a model missing from the volume fails with how to pre-fill it
#   GNWS_SKIP_PREPARE=1  run the command straight away (e.g. `docker compose run api gnws zoo`)
set -eu
if [ "${GNWS_SKIP_PREPARE:-0}" != "1" ]; then
    python /opt/gnws/prepare_models.py
fi
exec "$@"
