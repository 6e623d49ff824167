{{/* Names and labels. */}}
{{- define "handtrace.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "handtrace.fullname" -}}
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

{{- define "handtrace.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "handtrace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: handtrace
{{- end -}}

{{/* dict "root" $ "component" "stream" */}}
{{- define "handtrace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "handtrace.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "handtrace.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "handtrace.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "handtrace.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* One setting's value as an environment string: numbers without exponent (Helm reads YAML
     numbers as float64), mappings and lists as JSON. */}}
{{- define "handtrace.envValue" -}}
{{- $v := . -}}
{{- if or (kindIs "map" $v) (kindIs "slice" $v) -}}
{{- toJson $v -}}
{{- else if kindIs "float64" $v -}}
{{- if eq $v (float64 (int64 $v)) -}}{{- int64 $v -}}{{- else -}}{{- $v -}}{{- end -}}
{{- else -}}
{{- $v -}}
{{- end -}}
{{- end -}}

{{/* Walk `config`: every non-null leaf -> HANDTRACE_<PATH>. dict "prefix" "" "value" map "skip" list.
     $json: the settings whose value is a mapping (passed as JSON, not walked into; lists are
     JSON anyway); tests/unit/test_helm_chart.py keeps it equal to settings_helm.JSON_SETTINGS. */}}
{{- define "handtrace.envWalk" -}}
{{- $json := list "CONTROL__PUBLIC_KEYS" "WAREHOUSE__ENDPOINT_GROUPS" -}}
{{- $prefix := .prefix -}}
{{- $skip := .skip -}}
{{- range $key, $v := .value }}
{{- $name := printf "%s%s" $prefix (upper $key) -}}
{{- if has $name $json }}
{{- if $v }}
- name: HANDTRACE_{{ $name }}
  value: {{ include "handtrace.envValue" $v | quote }}
{{- end }}
{{- else if kindIs "map" $v }}
{{- include "handtrace.envWalk" (dict "prefix" (printf "%s__" $name) "value" $v "skip" $skip) }}
{{- else if and (not (kindIs "invalid" $v)) (not (has $name $skip)) }}
- name: HANDTRACE_{{ $name }}
  value: {{ include "handtrace.envValue" $v | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The environment of one component's container: config, then its secrets, then extraEnv.
     dict "root" $ "component" "stream" "extraEnv" list */}}
{{- define "handtrace.env" -}}
{{- $root := .root -}}
{{- $component := .component -}}
{{- $skip := list -}}
{{- range $section, $fields := $root.Values.secrets }}
{{- range $field, $s := $fields }}
{{- if $s.name }}{{ $skip = append $skip (printf "%s__%s" (upper $section) (upper $field)) }}{{ end }}
{{- end }}
{{- end }}
{{- include "handtrace.envWalk" (dict "prefix" "" "value" $root.Values.config "skip" $skip) }}
{{- range $section, $fields := $root.Values.secrets }}
{{- range $field, $s := $fields }}
{{- if and $s.name (has $component $s.components) }}
- name: HANDTRACE_{{ upper $section }}__{{ upper $field }}
  valueFrom:
    secretKeyRef:
      name: {{ $s.name }}
      key: {{ $s.key }}
{{- end }}
{{- end }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A setting of `config` with the service default when null: dict "root" $ "path" (list "stream" "metrics_port") "default" 9101 */}}
{{- define "handtrace.setting" -}}
{{- $v := .root.Values.config -}}
{{- range .path }}{{ $v = index $v . }}{{ end -}}
{{- if kindIs "invalid" $v }}{{ .default }}{{ else }}{{ include "handtrace.envValue" $v }}{{ end -}}
{{- end -}}

{{/* The /metrics port of a component; the chart needs it on (probes, ServiceMonitor). */}}
{{- define "handtrace.metricsPort" -}}
{{- $defaults := dict "stream" 9101 "sink" 9102 "fleet" 9103 -}}
{{- $port := include "handtrace.setting" (dict "root" .root "path" (list .component "metrics_port") "default" (index $defaults .component)) -}}
{{- if eq $port "0" -}}
{{- fail (printf "config.%s.metrics_port: 0 turns /metrics off, but the chart probes and scrapes it; leave it null or set a port" .component) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* Volumes every handtrace pod mounts: state and /tmp (the root filesystem is read-only), and
     the Kafka TLS Secret when given. */}}
{{- define "handtrace.volumes" -}}
- name: state
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if .Values.kafkaTls.secretName }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafkaTls.secretName }}
{{- end }}
{{- end -}}

{{- define "handtrace.volumeMounts" -}}
- name: state
  mountPath: /var/lib/handtrace
- name: tmp
  mountPath: /tmp
{{- if .Values.kafkaTls.secretName }}
- name: kafka-tls
  mountPath: {{ .Values.kafkaTls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Refuse values that cannot work in a cluster (fails closed, at render time). */}}
{{- define "handtrace.validate" -}}
{{- $cfg := .Values.config -}}
{{- if not $cfg.kafka.bootstrap_servers -}}
{{- fail "config.kafka.bootstrap_servers: set your Kafka cluster (a cluster has no local dev broker)" -}}
{{- end -}}
{{- if $cfg.dev_mode -}}
{{- fail "config.dev_mode: not in a cluster (it generates secrets per pod, so every worker would pseudonymise differently); give the secrets from Kubernetes Secrets" -}}
{{- end -}}
{{- if or .Values.sink.enabled .Values.fleet.enabled -}}
{{- if not .Values.secrets.clickhouse.dsn.name -}}
{{- if not (regexMatch "^https?://" (toString (default "" $cfg.clickhouse.dsn))) -}}
{{- fail "config.clickhouse.dsn: a ClickHouse server (http(s)://...) or secrets.clickhouse.dsn is needed: the embedded engine is one process's, not several pods'" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $partitions := int (include "handtrace.setting" (dict "root" . "path" (list "topics" "partitions") "default" 6)) -}}
{{- range $c := list "stream" "sink" -}}
{{- $w := index $.Values $c -}}
{{- if $w.enabled -}}
{{- $most := ternary $w.autoscaling.maxReplicas $w.replicas $w.autoscaling.enabled -}}
{{- if gt (int $most) $partitions -}}
{{- fail (printf "%s: %d replicas but %d partitions (config.topics.partitions); extra consumers of a group sit idle" $c (int $most) $partitions) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
