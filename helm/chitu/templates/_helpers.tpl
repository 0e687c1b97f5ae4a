{{/* Chart name, truncated to 63 characters. */}}
{{- define "chitu.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's resources. */}}
{{- define "chitu.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one stage of one model: <fullname>-<model>-<stage>, DNS-safe, <= 63 characters. */}}
{{- define "chitu.stageName" -}}
{{- printf "%s-%s-%s" (include "chitu.fullname" .root) (.model | lower | replace "_" "-" | replace "." "-") .stage | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Common labels. */}}
{{- define "chitu.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "chitu.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component (orchestrator, or <model>-<stage>). */}}
{{- define "chitu.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chitu.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The pinned image reference. */}}
{{- define "chitu.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The stage instances of one model, as a YAML list of {stage, kind, component}: a second expert
     (twoExperts) adds a second denoiser group running transformer_2; a model that borrows another model's
     encoder (encoderFrom) or VAE (vaeFrom) has none of its own. */}}
{{- define "chitu.modelStages" -}}
{{- $m := .model -}}
{{- if not $m.encoderFrom }}
- {stage: encoder, kind: encoder, component: ""}
{{- end }}
- {stage: denoiser, kind: denoiser, component: transformer}
{{- if $m.twoExperts }}
- {stage: denoiser-2, kind: denoiser, component: transformer_2}
{{- end }}
{{- if not $m.vaeFrom }}
- {stage: vae, kind: vae, component: ""}
{{- end }}
{{- end -}}

{{/* Names of the models that borrow this model's encoder (kind=encoder) or VAE (kind=vae): their aliases. */}}
{{- define "chitu.borrowers" -}}
{{- $out := list -}}
{{- $field := ternary "encoderFrom" "vaeFrom" (eq .kind "encoder") -}}
{{- range .root.Values.models -}}
{{- if eq (default "" (index . $field)) $.model -}}
{{- $out = append $out .name -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Security of every service's `server` block (TLS, mutual TLS, token, the plaintext health port for the
     probes), as YAML to nindent under `server:`. A token without TLS fails: it would travel in plaintext. */}}
{{- define "chitu.serverSecurity" -}}
{{- $sec := .Values.security -}}
{{- if and $sec.token.secretName (not $sec.tls.secretName) -}}
{{- fail "security.token.secretName needs security.tls.secretName: a bearer token never travels in plaintext" -}}
{{- end -}}
{{- if $sec.tls.secretName }}
health_port: {{ .Values.healthPort }}
tls:
  cert_file: /etc/chitu-tls/tls.crt
  key_file: /etc/chitu-tls/tls.key
  {{- if $sec.tls.mutual }}
  client_ca_file: /etc/chitu-tls/ca.crt
  {{- end }}
{{- end }}
{{- if $sec.token.secretName }}
auth:
  token_file: /etc/chitu-token/token
{{- end }}
{{- end -}}

{{/* How the orchestrator reaches its stages (the orchestrator config's `stage_client`), as YAML. */}}
{{- define "chitu.stageClient" -}}
{{- $sec := .Values.security -}}
{{- if $sec.tls.secretName }}
ca_file: /etc/chitu-tls/ca.crt
{{- if $sec.tls.mutual }}
cert_file: /etc/chitu-tls/tls.crt
key_file: /etc/chitu-tls/tls.key
{{- end }}
{{- if $sec.token.secretName }}
token_file: /etc/chitu-token/token
{{- end }}
{{- end }}
{{- end -}}

{{/* The port the probes ask: the plaintext health port when TLS is on. */}}
{{- define "chitu.probePort" -}}
{{- if .Values.security.tls.secretName -}}{{ .Values.healthPort }}{{- else -}}{{ .Values.grpcPort }}{{- end -}}
{{- end -}}

{{/* Extra container ports, volume mounts and volumes for TLS and the token. */}}
{{- define "chitu.securityPorts" -}}
{{- if .Values.security.tls.secretName }}
- name: health
  containerPort: {{ .Values.healthPort }}
{{- end }}
{{- end -}}

{{- define "chitu.securityMounts" -}}
{{- if .Values.security.tls.secretName }}
- {name: tls, mountPath: /etc/chitu-tls, readOnly: true}
{{- end }}
{{- if .Values.security.token.secretName }}
- {name: token, mountPath: /etc/chitu-token, readOnly: true}
{{- end }}
{{- end -}}

{{- define "chitu.securityVolumes" -}}
{{- if .Values.security.tls.secretName }}
- name: tls
  secret: {secretName: {{ .Values.security.tls.secretName }}}
{{- end }}
{{- if .Values.security.token.secretName }}
- name: token
  secret: {secretName: {{ .Values.security.token.secretName }}}
{{- end }}
{{- end -}}
