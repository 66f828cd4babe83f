#!/bin/sh
# Entry point of the dev image (Dockerfile, --target dev): `keyvault dev`
# reachable from outside its container.
#
# `keyvault dev` serves on 127.0.0.1, which inside a container nobody else
# can reach: `docker run -p` forwards to the container's own interface, not
# to its loopback. Asked for --listen 0.0.0.0:8080 it refuses, rightly: the
# API would then be plain HTTP on the network, which a config allows only
# with `insecure_plaintext: true`. So, on the first start, this script lets
# `keyvault dev` set up its directory (SoftHSM token, keys, bbolt file,
# bearer token, keyvault.yaml) while serving on loopback, stops it once it
# serves, and adds `insecure_plaintext: true` to the generated keyvault.yaml.
# Then, on every start, it runs `keyvault dev` on that directory with the
# listen addresses below. Publish the ports on the host's loopback only
# (docker run -p 127.0.0.1:8080:8080 ...): the bearer token and PINs cross
# the container network in clear text.
#
# Environment (defaults set in the Dockerfile):
#   KEYVAULT_DEV_DIR           the dev directory; keep it on a volume
#   KEYVAULT_DEV_LISTEN        the API address (0.0.0.0:8080)
#   KEYVAULT_DEV_ADMIN_LISTEN  /metrics, /healthz, /readyz (0.0.0.0:9090)
set -eu

dir=${KEYVAULT_DEV_DIR:-/var/lib/keyvault/dev}
listen=${KEYVAULT_DEV_LISTEN:-0.0.0.0:8080}
admin=${KEYVAULT_DEV_ADMIN_LISTEN:-0.0.0.0:9090}
cfg=$dir/keyvault.yaml

if [ ! -e "$cfg" ]; then
	log=$(mktemp)
	keyvault dev --dir "$dir" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$log" 2>&1 &
	pid=$!
	# Stop it only once it serves: by then the setup is complete and
	# SIGTERM shuts it down cleanly, never half-way through opening the
	# database.
	until grep -q '"msg":"keyvault serving"' "$log"; do
		if ! kill -0 "$pid" 2>/dev/null; then
			cat "$log" >&2
			echo "keyvault-dev-entrypoint: setting up $dir failed" >&2
			rm -f "$log"
			exit 1
		fi
		sleep 0.2
	done
	kill -TERM "$pid"
	wait "$pid" || true
	# The setup's own report (keys and their check values), without the
	# loopback run's serving lines.
	sed '/^keyvault dev: serving/,$d' "$log"
	rm -f "$log"
fi

if grep -q '^insecure_plaintext:' "$cfg"; then
	sed -i 's/^insecure_plaintext:.*/insecure_plaintext: true   # set by the dev image: see dev-entrypoint.sh/' "$cfg"
else
	printf '%s\n' '# Added by the dev image (deploy/docker/dev-entrypoint.sh): plain HTTP on' \
		'# the container network. Publish the ports on the host loopback only.' \
		'insecure_plaintext: true' >>"$cfg"
fi

exec keyvault dev --dir "$dir" --listen "$listen" --admin-listen "$admin"
