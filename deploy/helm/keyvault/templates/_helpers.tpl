{{/* The release's object names: the release name, with "-keyvault" unless it holds "keyvault". */}}
{{- define "keyvault.fullname" -}}
{{- if contains "keyvault" .Release.Name -}}
{{- .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-keyvault" .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "keyvault.selectorLabels" -}}
app.kubernetes.io/name: keyvault
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keyvault.labels" -}}
{{ include "keyvault.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The server pods: selected by the Services, the PDB and the NetworkPolicy. */}}
{{- define "keyvault.serverSelectorLabels" -}}
{{ include "keyvault.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "keyvault.checkMode" -}}
{{- if not (has .Values.mode (list "bbolt" "etcd")) -}}
{{- fail (printf "mode %q: want bbolt or etcd" .Values.mode) -}}
{{- end -}}
{{- end -}}

{{/*
keyvault.yaml. The keys that must agree with the pod's ports and mounts are
set here and win over .Values.config.
*/}}
{{- define "keyvault.config" -}}
{{- include "keyvault.checkMode" . -}}
{{- $v := .Values -}}
{{- $c := dict "listen" (printf "0.0.0.0:%d" (int $v.ports.api)) "admin_listen" (printf "0.0.0.0:%d" (int $v.ports.admin)) -}}
{{- if $v.tls.enabled -}}
{{- $tls := dict "cert_file" "/etc/keyvault/tls/tls.crt" "key_file" "/etc/keyvault/tls/tls.key" -}}
{{- if $v.tls.clientCA -}}{{- $_ := set $tls "client_ca_file" "/etc/keyvault/tls/ca.crt" -}}{{- end -}}
{{- $_ := set $c "tls" $tls -}}
{{- else -}}
{{- $_ := set $c "insecure_plaintext" true -}}
{{- end -}}
{{- if $v.adminTLS.enabled -}}
{{- $atls := dict "cert_file" "/etc/keyvault/tls/tls.crt" "key_file" "/etc/keyvault/tls/tls.key" -}}
{{- if $v.adminTLS.clientCA -}}{{- $_ := set $atls "client_ca_file" "/etc/keyvault/tls/ca.crt" -}}{{- end -}}
{{- $_ := set $c "admin_tls" $atls -}}
{{- end -}}
{{- if eq $v.mode "bbolt" -}}
{{- $_ := set $c "store" (dict "driver" "bolt" "path" "/var/lib/keyvault/keyvault.db" "rollback_anchor" $v.bbolt.rollbackAnchor) -}}
{{- else -}}
{{- if not $v.etcd.endpoints -}}{{- fail "etcd.endpoints: at least one" -}}{{- end -}}
{{- range $v.etcd.endpoints -}}
{{- if and (not (hasPrefix "https://" .)) (not $v.etcd.insecurePlaintext) -}}
{{- fail (printf "etcd.endpoints: %q is not https:// (keyvault refuses plain http to etcd unless etcd.insecurePlaintext)" .) -}}
{{- end -}}
{{- end -}}
{{- $etls := dict "ca_file" "/etc/keyvault/etcd/ca.crt" -}}
{{- if $v.etcd.clientCert -}}
{{- $_ := set $etls "cert_file" "/etc/keyvault/etcd/tls.crt" -}}
{{- $_ := set $etls "key_file" "/etc/keyvault/etcd/tls.key" -}}
{{- end -}}
{{- $e := dict "endpoints" $v.etcd.endpoints "key_prefix" $v.etcd.keyPrefix "tls" $etls -}}
{{- if $v.etcd.insecurePlaintext -}}{{- $_ := set $e "insecure_plaintext" true -}}{{- end -}}
{{- $_ := set $c "store" (dict "driver" "etcd" "etcd" $e) -}}
{{- end -}}
{{- $members := list -}}
{{- range $v.hsm.members -}}
{{- $members = append $members (dict "name" .name "module" .module "token_label" .tokenLabel "pin_file" (printf "/etc/keyvault/hsm/%s-pin" .name) "max_sessions" (int (default 8 .maxSessions))) -}}
{{- end -}}
{{- $hsm := dict "members" $members -}}
{{- if $v.hsm.moduleEnv -}}{{- $_ := set $hsm "module_env" $v.hsm.moduleEnv -}}{{- end -}}
{{- $_ := set $c "hsm" $hsm -}}
{{- $_ := set $c "clients" $v.clients -}}
{{- toYaml (merge $c (deepCopy (default dict $v.config))) -}}
{{- end -}}

{{/* The volumes the server and the keys Job share. */}}
{{- define "keyvault.volumes" -}}
- name: config
  configMap:
    name: {{ include "keyvault.fullname" . }}-config
- name: hsm-pins
  secret:
    secretName: {{ .Values.hsm.pinSecretName }}
    defaultMode: 0440
{{- if or .Values.tls.enabled .Values.adminTLS.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if eq .Values.mode "etcd" }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.tlsSecretName }}
    defaultMode: 0440
{{- end }}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- end -}}

{{- define "keyvault.volumeMounts" -}}
- name: config
  mountPath: /etc/keyvault/keyvault.yaml
  subPath: keyvault.yaml
  readOnly: true
- name: hsm-pins
  mountPath: /etc/keyvault/hsm
  readOnly: true
{{- if or .Values.tls.enabled .Values.adminTLS.enabled }}
- name: tls
  mountPath: /etc/keyvault/tls
  readOnly: true
{{- end }}
{{- if eq .Values.mode "etcd" }}
- name: etcd-tls
  mountPath: /etc/keyvault/etcd
  readOnly: true
{{- end }}
- name: tmp   # PKCS#11 modules may want a writable /tmp
  mountPath: /tmp
{{- end -}}

{{/*
A probe on the admin port: HTTP, HTTPS with adminTLS (the kubelet does not
check the certificate), a TCP connection with adminTLS.clientCA (the kubelet
has no client certificate). Argument: (list . path).
*/}}
{{- define "keyvault.probe" -}}
{{- $ := index . 0 -}}
{{- if and $.Values.adminTLS.enabled $.Values.adminTLS.clientCA -}}
tcpSocket:
  port: admin
{{- else -}}
httpGet:
  path: {{ index . 1 }}
  port: admin
  {{- if $.Values.adminTLS.enabled }}
  scheme: HTTPS
  {{- end }}
{{- end -}}
{{- end -}}

{{/* The server's pod template, for the StatefulSet and the Deployment. */}}
{{- define "keyvault.podTemplate" -}}
metadata:
  labels:
    {{- include "keyvault.labels" . | nindent 4 }}
    app.kubernetes.io/component: server
  annotations:
    # A config change rolls the pods: keyvault reads its config at start.
    checksum/config: {{ include "keyvault.config" . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: keyvault
      image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["serve", "--config", "/etc/keyvault/keyvault.yaml"]
      ports:
        - name: api
          containerPort: {{ .Values.ports.api }}
          protocol: TCP
        - name: admin
          containerPort: {{ .Values.ports.admin }}
          protocol: TCP
      # keyvault opens its store and HSM members before it listens: the
      # startup probe gives a slow HSM a minute before liveness counts.
      startupProbe:
        {{- include "keyvault.probe" (list . "/healthz") | nindent 8 }}
        periodSeconds: 2
        failureThreshold: 30
      livenessProbe:
        {{- include "keyvault.probe" (list . "/healthz") | nindent 8 }}
        periodSeconds: 10
        timeoutSeconds: 3
        failureThreshold: 6
      # /readyz fails while no HSM member is healthy or the store does not
      # answer: the Service then sends no traffic here.
      readinessProbe:
        {{- include "keyvault.probe" (list . "/readyz") | nindent 8 }}
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 2
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "keyvault.volumeMounts" . | nindent 8 }}
        {{- if eq .Values.mode "bbolt" }}
        - name: data
          mountPath: /var/lib/keyvault
        {{- end }}
  volumes:
    {{- include "keyvault.volumes" . | nindent 4 }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if eq .Values.mode "etcd" }}
  # Spread the pods over nodes, so that one node's loss leaves the others.
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "keyvault.serverSelectorLabels" . | nindent 10 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
