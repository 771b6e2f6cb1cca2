{{/* Chart name, overridable. */}}
{{- define "agentwire.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-agentwire, or the release name when it already contains the chart name. */}}
{{- define "agentwire.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "agentwire.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "agentwire.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentwire.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agentwire.labels" -}}
helm.sh/chart: {{ include "agentwire.chart" . }}
{{ include "agentwire.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agentwire
{{- end }}

{{/*
The chart's probe pods (the helm test pod and the probe CronJob's): labels of their own, with another
app.kubernetes.io/name, so that no selector of the gateway's pods (the Services, the PDB, the
NetworkPolicy's podSelector, topologySpreadConstraints) counts or restricts them. The NetworkPolicy lets
pods with these selector labels reach both doors.
*/}}
{{- define "agentwire.probeSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-probe" (include "agentwire.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agentwire.probeLabels" -}}
helm.sh/chart: {{ include "agentwire.chart" . }}
{{ include "agentwire.probeSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agentwire
{{- end }}

{{/*
The egress ports of the URLs the gateway calls (config.upstream.webhook_url, auth.subscribeWebhook,
auth.jwksUrl): the URL's port, else 443 for https and 80 for http; one line per distinct port, sorted.
*/}}
{{- define "agentwire.webhookPorts" -}}
{{- $ports := dict }}
{{- $urls := list .Values.config.upstream.webhook_url .Values.auth.subscribeWebhook .Values.auth.jwksUrl }}
{{- range $agent := .Values.config.agui.agents }}{{ $urls = append $urls $agent.url }}{{ end }}
{{- range $urls }}
{{- if . }}
{{- $u := urlParse . }}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" $u.host) }}
{{- if not $port }}{{ $port = ternary "443" "80" (eq $u.scheme "https") }}{{ end }}
{{- $_ := set $ports $port true }}
{{- end }}
{{- end }}
{{- range keys $ports | sortAlpha }}
{{ . }}
{{- end }}
{{- end }}

{{/* The probe container: `agentwire probe` through both Services (the helm test pod, the CronJob). */}}
{{- define "agentwire.probeContainer" -}}
- name: probe
  image: {{ default (include "agentwire.image" .) .Values.tests.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  # A full five-event run through both Services: published over POST /v1/events on the internal one,
  # received over /ws on the public one, in order, and the channel's ledger balanced. Exit 0 = healthy;
  # any lost or undelivered event fails.
  args:
    - probe
    - --url
    - http://{{ include "agentwire.fullname" . }}:{{ .Values.service.port }}
    - --api-url
    - http://{{ include "agentwire.internalName" . }}:{{ .Values.internalService.port }}
  {{- with .Values.auth.existingSecret }}
  {{- $keys := $.Values.auth.existingSecretKeys }}
  # The probe's producer key, operator key and browser token, from auth.existingSecret (never on the
  # command line). Optional: without them the probe fails with 401 (keys) or unauthorized (token),
  # which names what is missing.
  env:
    {{- range $name, $key := dict "AGENTWIRE_PROBE_PRODUCER_KEY" $keys.probeProducerKey "AGENTWIRE_PROBE_OPERATOR_KEY" $keys.probeOperatorKey "AGENTWIRE_PROBE_TOKEN" $keys.probeToken }}
    - name: {{ $name }}
      valueFrom:
        secretKeyRef:
          name: {{ $.Values.auth.existingSecret }}
          key: {{ $key }}
          optional: true
    {{- end }}
  {{- end }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end }}

{{- define "agentwire.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agentwire.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "agentwire.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* True (non-empty) when a Redis broker is configured. */}}
{{- define "agentwire.redis" -}}
{{- if or .Values.broker.redisUrl .Values.broker.existingSecret }}true{{ end }}
{{- end }}

{{- define "agentwire.redisSecretName" -}}
{{- default (printf "%s-broker" (include "agentwire.fullname" .)) .Values.broker.existingSecret }}
{{- end }}

{{- define "agentwire.redisSecretKey" -}}
{{- if .Values.broker.existingSecret }}{{ .Values.broker.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{/* The internal Service: the internal door (/v1/*, /metrics, /readyz), for the cluster only. */}}
{{- define "agentwire.internalName" -}}
{{- printf "%s-internal" (include "agentwire.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/*
Refuses what cannot work or is not safe to deploy:
- neither auth.existingSecret nor an explicit auth.insecure: the chart binds the internal door to the pod's
  address, where the gateway refuses to start without producer and operator keys (exit 64), and without a
  JWT key the gateway admits WebSocket clients from loopback only, so no browser could connect through a
  Service. The Secret holds the JWT key and both key lists; auth.insecure is for a trusted network only;
- auth.existingSecret with jwtKeyType none but without auth.insecure (the same loopback-only /ws);
- one port for both doors;
- several replicas on the embedded broker (each pod would hold its own channels, so a client on one pod
  would never see events published through another).
*/}}
{{- define "agentwire.validate" -}}
{{- $insecure := eq .Values.auth.insecure true }}
{{- if not (or .Values.auth.existingSecret $insecure) }}
{{- fail "set auth.existingSecret, or auth.insecure: true explicitly. auth.existingSecret names a Secret you create that holds the JWT key browsers' tokens are verified with (jwt-secret, or jwt-public-key with auth.jwtKeyType=publicKey) and both key lists of the internal door (producer-keys, operator-keys: JSON lists); without them the gateway refuses to start on the pod's address and lets only loopback peers open /ws, so no browser could connect through the Service. auth.insecure: true lets anyone who reaches /ws connect as any user: only behind an authenticating proxy or on a trusted network. List the origins of your web app's pages in auth.allowedOrigins (helm/agentwire/README.md, docs/security.md)" }}
{{- end }}
{{- if and .Values.auth.existingSecret (eq .Values.auth.jwtKeyType "none") (not $insecure) (not .Values.auth.jwksUrl) }}
{{- fail "auth.jwtKeyType=none needs auth.jwksUrl or auth.insecure: true: without a JWT key the gateway lets only loopback peers open /ws, so no browser could connect through the Service. Put the JWT key in auth.existingSecret (jwtKeyType secret or publicKey), or set auth.jwksUrl" }}
{{- end }}
{{- if and .Values.auth.jwksUrl (ne .Values.auth.jwtKeyType "none") }}
{{- fail "auth.jwksUrl and a JWT key in the Secret are two sources of keys: set auth.jwtKeyType=none with auth.jwksUrl" }}
{{- end }}
{{- if eq (int .Values.containerPort) (int .Values.internalPort) }}
{{- fail (printf "containerPort and internalPort are both %d: the public door and the internal door need a port each" (int .Values.containerPort)) }}
{{- end }}
{{- if not (include "agentwire.redis" .) }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail (printf "replicaCount=%d needs the Redis broker: set broker.redisUrl or broker.existingSecret (the embedded broker keeps channels in one pod's memory)" (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) 1) }}
{{- fail (printf "autoscaling.maxReplicas=%d needs the Redis broker: set broker.redisUrl or broker.existingSecret (the embedded broker keeps channels in one pod's memory)" (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
{{- $d := .Values.drain }}
{{- $need := add $d.preStopSeconds $d.delaySeconds $d.closeWindowSeconds $d.timeoutSeconds }}
{{- if and (not (kindIs "invalid" $d.terminationGracePeriodSeconds)) (lt (int $d.terminationGracePeriodSeconds) (int $need)) }}
{{- fail (printf "drain.terminationGracePeriodSeconds=%d is shorter than the drain sequence (preStopSeconds + delaySeconds + closeWindowSeconds + timeoutSeconds = %d): pods would be killed before every client got its 1012" (int $d.terminationGracePeriodSeconds) (int $need)) }}
{{- end }}
{{- end }}

{{/* terminationGracePeriodSeconds: the drain sequence plus slack, unless set. */}}
{{- define "agentwire.terminationGracePeriodSeconds" -}}
{{- $d := .Values.drain }}
{{- if kindIs "invalid" $d.terminationGracePeriodSeconds }}
{{- add $d.preStopSeconds $d.delaySeconds $d.closeWindowSeconds $d.timeoutSeconds $d.slackSeconds }}
{{- else }}
{{- int $d.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}
