{{/* Name of the chart, cut to 63 characters. */}}
{{- define "rao.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's objects. */}}
{{- define "rao.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "rao.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "rao.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the operator's pods. */}}
{{- define "rao.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rao.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Name of the ServiceAccount. */}}
{{- define "rao.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rao.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules the operator needs; one list for the ClusterRole and the namespaced Roles. */}}
{{- define "rao.rules" -}}
# Watch RegistryAccess objects.
- apiGroups: ["registry-access.io"]
  resources: ["registryaccesses"]
  verbs: ["get", "list", "watch"]
# Write their status (server-side apply is a PATCH).
- apiGroups: ["registry-access.io"]
  resources: ["registryaccesses/status"]
  verbs: ["patch"]
# Read client Secrets and token Secrets (watched metadata-only), create and update token
# Secrets with server-side apply (a PATCH, plus create when the Secret does not exist yet).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Follow the ServiceAccounts that RegistryAccess objects authenticate with (metadata only: their
# uid and opt-in annotation), and mint short-lived tokens of them for Keycloak (TokenRequest API;
# the operator only does so for a ServiceAccount annotated registry-access.io/keycloak-issuers).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["serviceaccounts/token"]
  verbs: ["create"]
# Read CA bundles that RegistryAccess objects name in spec.tls.caBundleRef (kind ConfigMap).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
# Write Events on RegistryAccess objects (first token, refresh failing, recovered, conflict);
# repeated Events are patched into a series.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.podNudge.enabled }}
# Follow the pods of namespaces that have RegistryAccess objects (which Secrets they mount or
# read through env/subPath), and change one annotation of a running pod that mounts a token
# Secret after each write, so its kubelet updates the file at once. The admission policy
# <release>-pod-nudge-only lets this identity change nothing else in a pod.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}


{{/* True when leader election is on: true, or "auto" with more than one replica. */}}
{{- define "rao.leaderElection" -}}
{{- $e := .Values.leaderElection.enabled -}}
{{- if eq (toString $e) "auto" -}}
{{- if gt (int .Values.replicaCount) 1 -}}true{{- end -}}
{{- else if $e -}}true{{- end -}}
{{- end -}}

{{/* The operator image: repository@digest when a digest is set, else repository:tag. */}}
{{- define "rao.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Name of the Secret that holds the operator's key for client-secret digests. */}}
{{- define "rao.digestKeySecret" -}}
{{- printf "%s-digest-key" (include "rao.fullname" .) -}}
{{- end -}}
