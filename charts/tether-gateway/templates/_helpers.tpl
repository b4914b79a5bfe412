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

{{/* Cross-field checks the JSON schema cannot word clearly. */}}
{{- define "tether-gateway.validate" -}}
{{- if not .Values.trustDomain -}}
{{- fail "trustDomain is required: the SPIFFE trust domain of your agents and control-plane callers, e.g. tether.example.com" -}}
{{- end -}}
{{- if not .Values.tls.existingSecret -}}
{{- fail "tls.existingSecret is required: a Secret with ca.crt, tls.crt and tls.key (see `tether-gateway pki init`)" -}}
{{- end -}}
{{- if and (eq .Values.store.type "postgres") (not .Values.store.postgres.existingSecret) -}}
{{- fail "store.postgres.existingSecret is required when store.type is postgres" -}}
{{- end -}}
{{- if and (eq .Values.store.type "embedded") (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 needs store.type=postgres: the embedded store is one ReadWriteOnce volume" -}}
{{- end -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (include "tether-gateway.drainSeconds" . | int) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed tunnel.drainTimeout (%s), or pods are killed mid-drain" (int .Values.terminationGracePeriodSeconds) .Values.tunnel.drainTimeout) -}}
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

{{/* /etc/tether: gateway.toml plus the PKI Secret under tls/, one read-only projected volume. */}}
{{- define "tether-gateway.configVolume" -}}
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
{{- end -}}

