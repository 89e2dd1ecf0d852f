#!/bin/sh
# with-ray-node COMMAND...: make this container a node of the Ray cluster, run
# COMMAND, and leave the cluster when it ends.
#
# `ray.init(address="host:port")` only connects a driver on a machine that runs a
# raylet of that cluster; a process elsewhere fails with "No node info found". The
# dispatchers (`ndif-server worker`) and `ndif-workers serve` are such drivers, so
# their containers join first.
#
#   NDIF_RAY_ADDRESS  the head's GCS, host:port (e.g. ray-head:6379)
#   RAY_NODE_ARGS     extra `ray start` flags, e.g. "--num-cpus=0 --num-gpus=0" for a
#                     node that must never host a model actor
#   RAY_AUTH_MODE / RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)  the cluster's token
set -eu

address="${NDIF_RAY_ADDRESS:?set NDIF_RAY_ADDRESS to the Ray head (host:port)}"

# RAY_NODE_ARGS is a list of flags: split on spaces on purpose.
# shellcheck disable=SC2086
ray start --address="$address" --disable-usage-stats ${RAY_NODE_ARGS:-}

"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT

status=0
wait "$child" || status=$?
# A trapped signal ends the first wait early: wait for the command itself to finish.
if kill -0 "$child" 2>/dev/null; then
    status=0
    wait "$child" || status=$?
fi

ray stop >/dev/null 2>&1 || true
exit "$status"
