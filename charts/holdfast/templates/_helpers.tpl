{{/* Chart name, possibly overridden. */}}
{{- define "holdfast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-holdfast, or the release name when it already contains
the chart name. Kept at 40 characters so suffixed names (-operator,
-capture, -leader-election) stay valid.
*/}}
{{- define "holdfast.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := include "holdfast.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "holdfast.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "holdfast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector of the operator pods (immutable for the life of the Deployment). */}}
{{- define "holdfast.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "holdfast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The Holdfast image: repository:tag, or repository@digest. */}}
{{- define "holdfast.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "holdfast.serviceAccountName" -}}
{{- default (printf "%s-operator" (include "holdfast.fullname" .)) .Values.serviceAccount.name }}
{{- end }}

{{/* The ClusterRole the operator binds to each cluster's capture pods. */}}
{{- define "holdfast.captureClusterRole" -}}
{{- printf "%s-capture" (include "holdfast.fullname" .) }}
{{- end }}
