{{/* Chart name, overridable. */}}
{{- define "tether-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<name>, or <release> when it already contains the name. */}}
{{- define "tether-gateway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "tether-gateway.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tether-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable for the life of the release (Deployment selectors are immutable). */}}
{{- define "tether-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tether-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{/* The standard labels minus component. */}}
{{- define "tether-gateway.baseLabels" -}}
helm.sh/chart: {{ include "tether-gateway.chart" . }}
app.kubernetes.io/name: {{ include "tether-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: tether
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The standard app.kubernetes.io labels on every object (name, instance, version, component,
part-of, managed-by). */}}
{{- define "tether-gateway.labels" -}}
{{ include "tether-gateway.baseLabels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "tether-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tether-gateway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tether-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* tunnel.drainTimeout in seconds (the schema allows whole seconds or minutes). */}}
{{- define "tether-gateway.drainSeconds" -}}
{{- $d := .Values.tunnel.drainTimeout -}}
{{- if hasSuffix "m" $d -}}
{{- mul (trimSuffix "m" $d | int) 60 -}}
{{- else -}}
{{- trimSuffix "s" $d | int -}}
{{- end -}}
{{- end -}}

{{/* preStop.sleepSeconds with store.type=postgres (replicas behind a load balancer), else 0. */}}
{{- define "tether-gateway.preStopSeconds" -}}
{{- if eq .Values.store.type "postgres" -}}
{{- int .Values.preStop.sleepSeconds -}}
{{- else -}}
0
{{- end -}}
{{- end -}}

{{/* The headless Service giving every gateway pod a DNS name for the peer links. */}}
{{- define "tether-gateway.peersService" -}}
{{- printf "%s-peers" (include "tether-gateway.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* replicaCount, or the store's default: 1 embedded, 3 postgres. */}}
{{- define "tether-gateway.replicas" -}}
{{- if kindIs "invalid" .Values.replicaCount -}}
{{- if eq .Values.store.type "postgres" -}}3{{- else -}}1{{- end -}}
{{- else -}}
{{- int .Values.replicaCount -}}
{{- end -}}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot word clearly. */}}
{{- define "tether-gateway.validate" -}}
{{- if not .Values.trustDomain -}}
{{- fail "trustDomain is required: the SPIFFE trust domain of your agents and control-plane callers, e.g. tether.example.com" -}}
{{- end -}}
{{- if not .Values.tls.existingSecret -}}
{{- fail "tls.existingSecret is required: a Secret with ca.crt, tls.crt and tls.key (see `tether-gateway pki init`)" -}}
{{- end -}}
{{- $pg := .Values.store.postgres -}}
{{- if and (eq .Values.store.type "postgres") (not $pg.existingSecret) -}}
{{- fail (printf "store.postgres.existingSecret is required when store.type is postgres: create a Secret whose key %q holds the DSN (kubectl create secret generic tether-gateway-db --from-literal=%s='postgres://tether@db.example.com:5432/tether?sslmode=verify-full') and set store.postgres.existingSecret to its name (docs/install-gateway.md)" $pg.key $pg.key) -}}
{{- end -}}
{{- $replicas := include "tether-gateway.replicas" . | int -}}
{{- if and (eq .Values.store.type "embedded") (gt $replicas 1) -}}
{{- fail (printf "replicaCount is %d but store.type is embedded, which allows 1: its store is one ReadWriteOnce volume that one gateway process holds. Set replicaCount: 1, or run replicas on PostgreSQL: store.type: postgres with store.postgres.existingSecret (docs/install-gateway.md)" $replicas) -}}
{{- end -}}
{{- if eq .Values.store.type "postgres" -}}
{{- if and $pg.ca.existingSecret $pg.ca.existingConfigMap -}}
{{- fail "store.postgres.ca: set existingSecret or existingConfigMap, not both: the CA bundle comes from one of them" -}}
{{- end -}}
{{- if and (eq $pg.sslmode "disable") (or $pg.ca.existingSecret $pg.ca.existingConfigMap) -}}
{{- fail "store.postgres.ca is set but store.postgres.sslmode is disable, which never uses it: set sslmode to verify-full (or verify-ca), or remove the CA" -}}
{{- end -}}
{{- end -}}
{{- $preStop := include "tether-gateway.preStopSeconds" . | int -}}
{{- $drain := include "tether-gateway.drainSeconds" . | int -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (add $preStop $drain) -}}
{{- if gt $preStop 0 -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStop.sleepSeconds (%d) + tunnel.drainTimeout (%s) = %ds, or pods are killed mid-drain" (int .Values.terminationGracePeriodSeconds) $preStop .Values.tunnel.drainTimeout (add $preStop $drain)) -}}
{{- else -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed tunnel.drainTimeout (%s), or pods are killed mid-drain" (int .Values.terminationGracePeriodSeconds) .Values.tunnel.drainTimeout) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.store.type "postgres") (eq .Values.cluster.advertise "dns") (gt (len (include "tether-gateway.fullname" .)) 46) -}}
{{- fail (printf "cluster.advertise is dns but the release's full name %q is %d characters: a pod's name (it, a 10-character template hash and a 5-character suffix) must fit a 63-character DNS label. Shorten it with fullnameOverride (at most 46 characters), or set cluster.advertise: podIP" (include "tether-gateway.fullname" .) (len (include "tether-gateway.fullname" .))) -}}
{{- end -}}
{{- end -}}

{{- define "tether-gateway.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tether-gateway.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* /etc/tether: gateway.toml plus the PKI Secret under tls/, one read-only projected volume;
with store.type=postgres also the PostgreSQL password (postgres/password) and CA bundle
(postgres/ca.crt) when they are given. */}}
{{- define "tether-gateway.configVolume" -}}
{{- $pg := .Values.store.postgres -}}
- name: config
  projected:
    defaultMode: 0440
    sources:
      - configMap:
          name: {{ include "tether-gateway.fullname" . }}
          items:
            - key: gateway.toml
              path: gateway.toml
      - secret:
          name: {{ .Values.tls.existingSecret }}
          items:
            - key: ca.crt
              path: tls/ca.crt
            - key: tls.crt
              path: tls/tls.crt
            - key: tls.key
              path: tls/tls.key
      {{- if eq .Values.store.type "postgres" }}
      {{- with .Values.cluster.peerCA.existingSecret }}
      - secret:
          name: {{ . }}
          items:
            - key: {{ $.Values.cluster.peerCA.key }}
              path: peer/ca.key
      {{- end }}
      {{- with $pg.password.existingSecret }}
      - secret:
          name: {{ . }}
          items:
            - key: {{ $pg.password.key }}
              path: postgres/password
      {{- end }}
      {{- if $pg.ca.existingSecret }}
      - secret:
          name: {{ $pg.ca.existingSecret }}
          items:
            - key: {{ $pg.ca.key }}
              path: postgres/ca.crt
      {{- else if $pg.ca.existingConfigMap }}
      - configMap:
          name: {{ $pg.ca.existingConfigMap }}
          items:
            - key: {{ $pg.ca.key }}
              path: postgres/ca.crt
      {{- end }}
      {{- end }}
{{- end -}}

{{/* The environment of the gateway container and of the `helm test` pod (so the test checks the
same config): with store.type=postgres the DSN from its Secret, this replica's name from the
downward API, and the address it advertises to its peers. Empty with store.type=embedded. */}}
{{- define "tether-gateway.storeEnv" -}}
{{- if eq .Values.store.type "postgres" }}
# From the Secret, not the ConfigMap; with store.postgres.password set it holds no password.
- name: TETHER_STORE_DSN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.store.postgres.existingSecret }}
      key: {{ .Values.store.postgres.key }}
# A replica is named after its pod: unique among live pods, and a new pod is a new replica.
- name: TETHER_CLUSTER_REPLICA_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if eq .Values.cluster.advertise "dns" }}
# Peers reach it by name: the pod's hostname (its name) in the headless Service (the pod's
# `subdomain`), resolving to its IP whether it is Ready or not.
- name: TETHER_CLUSTER_ADVERTISE
  value: "$(TETHER_CLUSTER_REPLICA_ID).{{ include "tether-gateway.peersService" . }}.{{ .Release.Namespace }}.svc.{{ .Values.cluster.clusterDomain }}:7445"
{{- else }}
# Peers reach it at its pod IP.
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: TETHER_CLUSTER_ADVERTISE
  value: {{ if eq .Values.cluster.podIPFamily "IPv6" }}"[$(POD_IP)]:7445"{{ else }}"$(POD_IP):7445"{{ end }}
{{- end }}
{{- end }}
{{- end -}}
