{{- define "loraplex.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplex.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "loraplex.labels" -}}
{{ include "loraplex.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "loraplex.secretName" -}}
{{- .Values.auth.existingSecret | default (include "loraplex.fullname" .) -}}
{{- end -}}

{{- define "loraplex.hasSecret" -}}
{{- if or .Values.auth.existingSecret .Values.auth.adminToken .Values.auth.apiKey -}}true{{- end -}}
{{- end -}}

{{/* `loraplex serve` flags from the values: one flag per knob. */}}
{{- define "loraplex.args" -}}
- --host=0.0.0.0
- --port={{ .Values.service.httpPort }}
- --grpc-port={{ .Values.service.grpcPort }}
- --adapter-dir=/adapters
- --cache-dir=/cache
{{- with .Values.model.path }}
- --model=/models/{{ . }}
{{- end }}
{{- with .Values.model.servedModelName }}
- --served-model-name={{ . }}
{{- end }}
{{- with .Values.engine }}
- --dtype={{ .dtype }}
- --max-model-len={{ .maxModelLen }}
- --kv-cache-gib={{ .kvCacheGib }}
- --max-num-seqs={{ .maxNumSeqs }}
- --max-loras={{ .maxLoras }}
- --max-lora-rank={{ .maxLoraRank }}
- --max-cpu-loras={{ .maxCpuLoras }}
- --lora-kernels={{ .loraKernels }}
{{- with .loraDtype }}
- --lora-dtype={{ . }}
{{- end }}
{{- if not (kindIs "invalid" .enforceEager) }}
- {{ if .enforceEager }}--enforce-eager{{ else }}--no-enforce-eager{{ end }}
{{- end }}
- --tensor-parallel-size={{ .tensorParallelSize }}
- --pipeline-parallel-size={{ .pipelineParallelSize }}
- --data-parallel-size={{ .dataParallelSize }}
{{- end }}
- --max-tokens-limit={{ .Values.limits.maxTokens }}
{{- if .Values.limits.maxPromptTokens }}
- --max-prompt-tokens={{ .Values.limits.maxPromptTokens }}
{{- end }}
- --max-concurrent={{ .Values.admission.maxConcurrent }}
- --max-queued={{ .Values.admission.maxQueued }}
{{- if .Values.admission.maxQueueWaitSeconds }}
- --max-queue-wait={{ .Values.admission.maxQueueWaitSeconds }}
{{- end }}
{{- range $name, $weight := .Values.admission.adapterWeights }}
- --adapter-weight={{ $name }}={{ $weight }}
{{- end }}
- --drain-timeout={{ .Values.drainTimeoutSeconds }}
- --log-format=json
{{- if include "loraplex.hasSecret" . }}
- --admin-token-file=/secrets/admin-token
- --api-key-file=/secrets/api-key
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}
