#!/usr/bin/env bash
# Copies the alert rules into the chart and writes deploy/kubernetes from
# the chart deploy/helm/keyvault (mode bbolt), with the Helm Go SDK: run it
# after editing the chart or deploy/prometheus/keyvault-rules.yaml. The
# chart test (make test) fails while either copy is stale.
set -euo pipefail
cd "$(dirname "$0")/charttest"
go run ./gen
