{{/* Chart name, overridable. */}}
{{- define "tether-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<name>, or <release> when it already contains the name. */}}
{{- define "tether-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "tether-agent.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tether-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable for the life of the release (Deployment selectors are immutable). */}}
{{- define "tether-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tether-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{/* The standard labels minus component. */}}
{{- define "tether-agent.baseLabels" -}}
helm.sh/chart: {{ include "tether-agent.chart" . }}
app.kubernetes.io/name: {{ include "tether-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: tether
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The standard app.kubernetes.io labels on every object (name, instance, version, component,
part-of, managed-by). */}}
{{- define "tether-agent.labels" -}}
{{ include "tether-agent.baseLabels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "tether-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tether-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tether-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Name of the Secret holding tls.crt / tls.key (/ ca.crt). */}}
{{- define "tether-agent.identitySecretName" -}}
{{- if .Values.identity.existingSecret -}}
{{- .Values.identity.existingSecret -}}
{{- else -}}
{{- printf "%s-identity" (include "tether-agent.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
Cross-field checks the JSON schema cannot word clearly. Included by every template that needs
them, so `helm template` fails with one readable line.
*/}}
{{- define "tether-agent.validate" -}}
{{- if not .Values.gateway.addresses -}}
{{- fail "gateway.addresses is required: the gateway address(es) the agent dials, e.g. --set 'gateway.addresses={gw.tether.example.com:443}'" -}}
{{- end -}}
{{- $id := .Values.identity -}}
{{- if $id.awsSecretsManager -}}
{{- $others := list -}}
{{- range $k := list "existingSecret" "certificate" "privateKey" -}}
{{- if index $id $k -}}{{- $others = append $others (printf "identity.%s" $k) -}}{{- end -}}
{{- end -}}
{{- if $others -}}
{{- fail (printf "identity.awsSecretsManager cannot be combined with %s: the agent reads its certificate and key from the Secrets Manager secret; set exactly one identity source" (join ", " $others)) -}}
{{- end -}}
{{- else if $id.existingSecret -}}
{{- if or $id.certificate $id.privateKey -}}
{{- fail "identity: set either identity.existingSecret or identity.certificate + identity.privateKey, not both" -}}
{{- end -}}
{{- else -}}
{{- if not (and $id.certificate $id.privateKey) -}}
{{- fail "identity is required: set identity.existingSecret (a Secret with tls.crt, tls.key, ca.crt), both identity.certificate and identity.privateKey (PEM), or identity.awsSecretsManager (a Secrets Manager secret name or ARN). Bootstrap-token enrollment is not available yet." -}}
{{- end -}}
{{- if not .Values.gateway.caBundle -}}
{{- fail "gateway.caBundle is required when the identity comes from identity.certificate/privateKey (only an identity.existingSecret can supply ca.crt)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.gatewayCIDRs) -}}
{{- fail "networkPolicy.gatewayCIDRs is required while networkPolicy.enabled: a NetworkPolicy matches IP ranges, not host names. Set the gateway's IP ranges, or networkPolicy.enabled=false" -}}
{{- end -}}
{{- range $name, $svc := .Values.services -}}
{{- if and (eq ($svc.kind | default "grpc") "tcp") $svc.ca -}}
{{- fail (printf "services.%s.ca: a tcp service is carried as raw bytes; the agent does not terminate TLS for it (remove ca, or use kind: grpc)" $name) -}}
{{- end -}}
{{- if eq $name "agent" -}}
{{- fail "services.agent: the name `agent` is reserved for the agent's built-in service" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.environments.egressAllow (ne .Values.environments.egress "deny") -}}
{{- fail "environments.egressAllow is used only with environments.egress=deny (with allow, nothing is restricted): set environments.egress=deny or remove it" -}}
{{- end -}}
{{- if and .Values.metrics.podMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.podMonitor.enabled needs metrics.enabled (otherwise the ops port is bound to loopback and cannot be scraped)" -}}
{{- end -}}
{{- end -}}

{{/* The distinct ports of gateway.addresses, for the NetworkPolicy. */}}
{{- define "tether-agent.gatewayPorts" -}}
{{- $ports := list -}}
{{- range .Values.gateway.addresses -}}
{{- $port := regexFind "[0-9]+$" . | int -}}
{{- if not (has $port $ports) -}}
{{- $ports = append $ports $port -}}
{{- end -}}
{{- end -}}
{{- toJson $ports -}}
{{- end -}}

{{/* Hardened container securityContext, shared by the agent and the test pod. */}}
{{- define "tether-agent.containerSecurityContext" -}}
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

{{- define "tether-agent.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
The /etc/tether volume: agent.toml (and the gateway CA bundle) from the ConfigMap plus the
identity Secret under identity/ (none with identity.awsSecretsManager: the agent reads its
identity from AWS at start), in one read-only projected volume. One volume rather than a
Secret mounted inside a ConfigMap mount, which runtimes may refuse (the ConfigMap mount is
read-only, so the nested mount point cannot be created).
*/}}
{{- define "tether-agent.configVolume" -}}
- name: config
  projected:
    defaultMode: 0440
    sources:
      - configMap:
          name: {{ include "tether-agent.fullname" . }}
          items:
            - key: agent.toml
              path: agent.toml
            {{- if .Values.gateway.caBundle }}
            - key: gateway-ca.crt
              path: gateway-ca.crt
            {{- end }}
            {{- range $name, $svc := .Values.services }}
            {{- if $svc.ca }}
            - key: service-{{ $name }}-ca.crt
              path: service-{{ $name }}-ca.crt
            {{- end }}
            {{- end }}
      {{- if not .Values.identity.awsSecretsManager }}
      - secret:
          name: {{ include "tether-agent.identitySecretName" . }}
          items:
            - key: tls.crt
              path: identity/tls.crt
            - key: tls.key
              path: identity/tls.key
            {{- if not .Values.gateway.caBundle }}
            - key: ca.crt
              path: identity/ca.crt
            {{- end }}
      {{- end }}
{{- end -}}

{{/* Cluster-scoped names carry the namespace: two releases of the same name must not collide. */}}
{{- define "tether-agent.clusterRoleName" -}}
{{- printf "%s-%s" .Release.Namespace (include "tether-agent.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
