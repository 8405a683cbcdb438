{{/* The release's name prefix for every object (Secrets, Services, ServiceAccounts...). */}}
{{- define "stagely.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains "stagely" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-stagely" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- /* The Secret the operator keeps the Projects' webhook secrets in, for the receiver. */ -}}
{{- define "stagely.webhookSecrets" -}}
{{ include "stagely.fullname" . }}-webhook-secrets
{{- end -}}

{{- define "stagely.labels" -}}
app.kubernetes.io/name: stagely
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "operator"). */}}
{{- define "stagely.selector" -}}
app.kubernetes.io/name: stagely
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: (dict "root" $ "image" .Values.operator.image); the tag defaults to appVersion. */}}
{{- define "stagely.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The restricted Pod Security Standard's container securityContext. */}}
{{- define "stagely.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The restricted Pod Security Standard's pod securityContext, as user `uid`. */}}
{{- define "stagely.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The Secret holding the Redis URL (bundled or external). */}}
{{- define "stagely.redisSecret" -}}
{{- printf "%s-redis-url" (include "stagely.fullname" .) -}}
{{- end -}}

{{/* The gateway's in-cluster Service name. */}}
{{- define "stagely.gatewayService" -}}
{{- printf "%s-gateway" (include "stagely.fullname" .) -}}
{{- end -}}

{{/* The wildcard TLS Secret the edge proxy serves. */}}
{{- define "stagely.wildcardSecret" -}}
{{- .Values.edgeProxy.tls.secretName | default (printf "%s-wildcard-tls" (include "stagely.fullname" .)) -}}
{{- end -}}

{{/* Scheduling and resources shared by every Deployment: (dict "root" $ "c" .Values.operator). */}}
{{- define "stagely.scheduling" -}}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The Redis Secret's content, for the pods' checksum annotation. */}}
{{- define "stagely.redisSecretData" -}}
{{- if .Values.redis.enabled -}}bundled{{- else -}}{{ .Values.redis.externalUrl }}{{- end -}}
{{- end -}}

{{/* The registry's host as image references name it. */}}
{{- define "stagely.registryHost" -}}
{{- if .Values.registry.enabled -}}
{{- .Values.registry.host | default (printf "%s-registry.%s.svc:%v" (include "stagely.fullname" .) .Release.Namespace .Values.registry.port) -}}
{{- else -}}
{{- .Values.registry.external.host -}}
{{- end -}}
{{- end -}}

{{/* The registry's HTTP API base URL for the operator's own calls. */}}
{{- define "stagely.registryUrl" -}}
{{- if .Values.registry.enabled -}}
{{- printf "http://%s-registry.%s.svc:%v" (include "stagely.fullname" .) .Release.Namespace .Values.registry.port -}}
{{- else -}}
{{- .Values.registry.external.url | default (printf "https://%s" .Values.registry.external.host) -}}
{{- end -}}
{{- end -}}

{{/* Where registry clients get their tokens. */}}
{{- define "stagely.tokenRealm" -}}
{{- if .Values.registry.tokenRealm -}}
{{- .Values.registry.tokenRealm -}}
{{- else if .Values.operator.gateway.publicUrl -}}
{{- $u := urlParse .Values.operator.gateway.publicUrl -}}
{{- printf "https://%s/v1/registry/token" $u.host -}}
{{- else -}}
{{- printf "%s://%s.%s.svc:%v/v1/registry/token" (ternary "https" "http" (not (empty .Values.operator.gateway.tlsSecretName))) (include "stagely.gatewayService" .) .Release.Namespace .Values.operator.gateway.port -}}
{{- end -}}
{{- end -}}
